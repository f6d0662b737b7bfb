"""
One stream's life in one worker: a coordinator over its fan-out (this
worker's players) and one data source.

The worker that holds the stream's owner lease is its I{owner}: its source is
an L{EngineFeed}, which reads the engine into the shared ring buffer and the
fan-out.  Any other worker with players for the stream follows the buffer
with a L{BufferTail}.  Promotion (the owner's lease lapsed: it died, or
handed the stream over) and demotion (another worker holds the lease) swap
the source; nothing else changes.  Role, state and health follow from the
source.

While Redis is down the owner goes on reading the engine and serving its own
players; when Redis is back, empty, the owner takes its lease again and
writes the stream's keys back.  With the embedded store there is only ever
one worker, the owner.

A stream is a L{MultiService} under the registry: its lease timer and its
source are its children, its fire-and-forget work goes through its
L{Tasks}, and stopping it (L{Stream.stop}, which disowns it) ends all of
that.
"""

from typing import Awaitable, Callable

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..background import Tasks, periodic
from ..config import Tuning
from ..constants import Event, Role, StreamState
from ..engine.api import EngineAPI
from ..engine.registry import Engine
from ..errors import EngineError, ProxyError, Unavailable
from ..hls.segments import StreamSegments
from ..hls.viewer import HlsViewer
from ..metrics import Metrics, StreamCount
from ..store.base import Store
from .fanout import FanOut
from .feed import EngineFeed
from .health import Health, health_of
from .idle import IdleCheck
from .lease import OwnerLease
from .metadata import metadata_of
from .ownership import Ownership
from .player import PlayerInfo, PlayerProducer
from .players import Players
from .ready import Readiness
from .tail import BufferTail
from .window import ChunkWindow, WindowBudget

_LIVE_STATES = frozenset({StreamState.STARTED, StreamState.UNHEALTHY, StreamState.RECONNECTING})


@attrs.define(eq=False)
class Stream(MultiService):
    """
    @ivar param: the query parameter name the first player used (C{infohash}
        or C{id}); the engine is asked with the same name.
    @ivar choose_engine: picks the engine for a new playback session.
    @ivar find_engine: the configured engine with a given id, if any.
    @ivar metrics: the worker's metrics; C{counted} is this stream's part
        of its gauges, moved as the stream's state and session change.
    """

    log = Logger()

    key: str
    param: str
    api: EngineAPI
    store: Store
    clock: object
    tuning: Tuning
    worker_id: str
    choose_engine: Callable[..., Awaitable[Engine]]
    find_engine: Callable[[str], Engine | None]
    source: EngineFeed | BufferTail | None = None
    #: The worker's cap on all windows' bytes, shared with its other streams.
    budget: WindowBudget | None = None
    started_at: float = 0.0
    metrics: Metrics = attrs.field(factory=Metrics)
    counted: StreamCount = attrs.field(init=False)
    tasks: Tasks = attrs.field(init=False)
    fanout: FanOut = attrs.field(init=False)
    lease: OwnerLease = attrs.field(init=False)
    players: Players = attrs.field(init=False)
    idle: IdleCheck = attrs.field(init=False)
    hls: StreamSegments = attrs.field(init=False)
    ownership: Ownership = attrs.field(init=False)
    ready: Readiness = attrs.field(factory=Readiness, init=False)
    #: Whether the source is being opened (a start or a takeover under way).
    starting: bool = attrs.field(default=False, init=False)
    _stopped: Deferred | None = attrs.field(default=None, init=False)
    _why: tuple = attrs.field(default=("stopped", False), init=False)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.setName(self.key)
        self.started_at = self.clock.seconds()
        self.counted = StreamCount(self.metrics)
        self.counted.set_state(StreamState.STARTING)
        self.tasks = Tasks(self.log, self.clock, f"stream {self.key}")
        window = ChunkWindow(
            self.tuning.buffer_chunks,
            self.tuning.chunk_ttl,
            max_bytes=self.tuning.buffer_bytes,
            max_seconds=self.tuning.buffer_seconds,
            budget=self.budget,
        )
        self.fanout = FanOut(window, self.tuning.join_chunks, metrics=self.metrics)
        self.lease = OwnerLease(self.key, self.store, self.clock, self.tuning.owner_lease)
        self.players = Players(
            self.key,
            self.store,
            self.clock,
            self.tuning,
            self.worker_id,
            self.fanout,
            self.tasks,
            self._player_left,
        )
        self.idle = IdleCheck(self)
        self.hls = StreamSegments(
            self.key,
            self.store,
            self.clock,
            self.fanout,
            self.tasks,
            self.tuning.hls_target_duration,
            self.tuning.hls_list_size,
            lambda: bool(self.players.viewers),
        )
        self.ownership = Ownership(self)
        # Often enough for a follower to notice a dead owner's worker soon
        # after its liveness lapsed; an owner renews every third of a lease.
        lease_check = min(self.tuning.owner_lease, self.tuning.worker_timeout) / 3
        periodic(lease_check, self.ownership.tick, self.clock, self.tasks).setServiceParent(self)

    # What the stream is now, derived from its source

    @property
    def role(self) -> Role:
        return Role.OWNER if isinstance(self.source, EngineFeed) else Role.FOLLOWER

    @property
    def state(self) -> StreamState:
        if self.stopping:
            return StreamState.STOPPING
        return self.source.state if self.source is not None else StreamState.STARTING

    @property
    def health(self) -> Health:
        return health_of(self.source.state) if self.source is not None else Health.HEALTHY

    @property
    def live(self) -> bool:
        """
        Serving players: started, and not stopping (it may be unhealthy or
        reconnecting).
        """
        return self.state in _LIVE_STATES

    @property
    def stopping(self) -> bool:
        return self._stopped is not None

    @property
    def engine(self) -> Engine | None:
        return getattr(self.source, "engine", None)

    @property
    def bytes_in(self) -> int:
        return getattr(self.source, "bytes_in", 0)

    @property
    def last_data_at(self) -> float | None:
        return self.source.last_data_at if self.source is not None else None

    # Starting

    def start(
        self,
        owner: bool,
        asked_at: float,
        engine: Engine | None = None,
        takeover: dict | None = None,
    ) -> None:
        """
        Begin serving: as owner (the lease was taken at C{asked_at}), open
        the engine session on C{engine}, or reuse the one in C{takeover}
        (the metadata a previous owner left) when it still plays; as
        follower, read the ring buffer.  Players wait with L{wait_ready}.
        """
        self.store.listen(self.key, self._event)
        if owner:
            self.lease.taken(asked_at)
            self.swap(self.ownership.feed(engine))
            start = self._start_owner(takeover)
        else:
            self.swap(self.ownership.tail())
            start = self._start_follower()
        # Set before the start runs: it clears it once the source is open,
        # which it may do before Tasks.run returns.
        self.starting = True
        self.tasks.run(start)

    def swap(self, source: EngineFeed | BufferTail) -> None:
        """
        Make C{source} the stream's data source, stopping the one before.
        """
        if self.source is not None:
            self.tasks.run(self.source.disownServiceParent())
        self.source = source
        source.setServiceParent(self)
        # The owner cuts the HLS segments every worker serves.
        if isinstance(source, EngineFeed):
            self.tasks.run(self.hls.start_cutting())
        else:
            self.hls.stop_cutting()
        if not self.stopping:
            self.counted.set_state(source.state)
            self.counted.set_engine(_session_engine(source, getattr(source, "playback", None)))

    def source_changed(self, source, name: str, value) -> None:
        """
        C{source} is about to set its C{name} (C{state}, or the engine
        C{playback} session it holds) to C{value}: move the stream's part
        of the worker's gauges, if C{source} is still its source.
        """
        if source is not self.source or self.stopping:
            return
        if name == "state":
            self.counted.set_state(value)
        elif name == "playback":
            self.counted.set_engine(_session_engine(source, value))
            if value is not None:
                self.hls.new_session()

    async def _start_owner(self, takeover: dict | None) -> None:
        try:
            await self.source.open(takeover, self.put_metadata)
        except Exception as e:
            return self._start_failed(e)
        finally:
            self.starting = False
        await self.now_owning("started", Event.STREAM_STARTED)
        self._open_to_players()

    async def _start_follower(self) -> None:
        try:
            await self.source.open()
        except Exception as e:
            return self._start_failed(e)
        finally:
            self.starting = False
        self.log.info("stream {key}: following its owner's buffer", key=self.key)
        self._open_to_players()

    async def now_owning(self, how: str, event: Event) -> None:
        """
        The engine's data flows to this owner: record it and tell the other
        workers.
        """
        await self.put_metadata()
        self.log.info(
            "stream {key} {how} on {engine} ({session})",
            key=self.key,
            how=how,
            engine=self.engine.id,
            session=self.source.playback.playback_session_id,
        )
        self.players.publish(event, engine=self.engine.id)

    def _open_to_players(self) -> None:
        self.ready.settle(True)
        if not self.players:
            self.idle.nobody_here()

    def _start_failed(self, e: Exception) -> None:
        if isinstance(e, CancelledError):
            return
        if isinstance(e, ProxyError):
            error = e
            self.log.warn("stream {key} failed to start: {why}", key=self.key, why=e.message)
        else:
            error = EngineError(f"stream {self.key} failed to start")
            self.log.failure("stream {key} failed to start", Failure(e), key=self.key)
        self.ready.settle(Failure(error))
        self.stop("start failed")

    def wait_ready(self) -> Deferred:
        """
        Fire when the stream has data for players, or fail with the
        L{ProxyError} that stopped it.
        """
        return self.ready.wait()

    # Players

    def add_player(self, info: PlayerInfo, request) -> PlayerProducer:
        self.idle.player_joined()
        return self.players.add(info, request)

    def add_viewer(self, info: PlayerInfo) -> HlsViewer:
        self.idle.player_joined()
        return self.players.add_viewer(info)

    def _player_left(self, player_id: str, remaining: int) -> None:
        if self.stopping:
            return
        self.players.publish(Event.PLAYER_DISCONNECTED, client_id=player_id, remaining=remaining)
        if remaining == 0 or (self.role is Role.FOLLOWER and not self.players):
            self.idle.nobody_here(remaining == 0)

    def refresh(self) -> Deferred:
        """
        The heartbeat round's periodic work for a stream: an owner stops it
        if no worker has had a player for the grace.
        """
        return self.idle.check()

    # Events from other workers

    def _event(self, event: dict) -> None:
        kind = event.get("event")
        mine = event.get("worker_id") == self.worker_id
        owner = self.role is Role.OWNER
        if kind == Event.CHUNK_ADDED and not owner and not mine:
            self.source.chunk_added(event.get("index"))
        elif kind == Event.PLAYER_DISCONNECTED and owner and event.get("remaining") == 0:
            self.idle.nobody_here()
        elif kind == Event.PLAYER_CONNECTED and owner:
            self.idle.player_joined(here=False)
        elif kind == Event.STREAM_STOPPING and not mine and not owner:
            self.stop("its owner stopped it")
        elif kind == Event.STOP_REQUESTED and owner:
            self.stop(str(event.get("why") or "stopped by another worker"))
        elif kind == Event.OWNER_CHANGED and not mine and event.get("handover"):
            # One of the stream's tasks, so that stopping it cancels the call.
            self.tasks.run(deferLater(self.clock, 0, self.tasks.run, self.ownership.tick))

    # Stopping

    def stop(self, why: str, handover: bool = False) -> Deferred:
        """
        End the stream here: players get a clean end of body.  An owner also
        tells the engine to stop and deletes the stream's keys, unless it
        hands the stream over (C{handover}: other workers still have
        players), in which case it only gives up the lease.  Idempotent;
        fires when all that is done.
        """
        if self._stopped is None:
            self._why = (why, handover)
        if self.parent is not None:
            self.disownServiceParent()
        return self.stopService()

    def stopService(self) -> Deferred:
        if self._stopped is None:
            self._stopped = Deferred()
            # On its way out: no longer counted in any state or session.
            self.counted.clear()
            Deferred.fromCoroutine(self._stop(*self._why)).chainDeferred(self._stopped)
        return self._stopped

    async def _stop(self, why: str, handover: bool) -> None:
        self.log.info("stream {key} stopping: {why}", key=self.key, why=why)
        owner = self.role is Role.OWNER
        self.idle.cancel()
        self.tasks.cancel_all()
        if not self.ready.result:
            self.ready.settle(Failure(EngineError(f"stream {self.key} stopped: {why}")))
        await MultiService.stopService(self)
        self.hls.close()
        self.players.finish_all()
        self.fanout.window.clear()
        self.store.unlisten(self.key, self._event)
        if owner:
            await (self.ownership.hand_over() if handover else self.ownership.end())
        await self.tasks.settle()
        self.log.info("stream {key} stopped", key=self.key)

    # Metadata

    async def put_metadata(self) -> None:
        """
        Write the metadata; while an owner starts, a store that is down
        fails the start.
        """
        try:
            await self.store.put_stream(self.key, self.metadata())
        except Unavailable:
            if self.role is Role.OWNER and self.starting:
                raise

    def write_metadata(self) -> None:
        """
        Put the metadata without waiting: a store that is down is no reason
        to hold anything up.
        """
        self.tasks.run(self.store.put_stream(self.key, self.metadata()))

    def metadata(self) -> dict:
        """
        The stream's metadata as the store keeps it.
        """
        return metadata_of(self)


def _session_engine(source, playback) -> str | None:
    """
    The id of the engine whose session C{source} reads with C{playback},
    if it is an engine feed holding one.
    """
    if playback is None or not isinstance(source, EngineFeed) or source.engine is None:
        return None
    return source.engine.id
