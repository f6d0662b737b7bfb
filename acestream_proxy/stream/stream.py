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
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..background import Tasks, periodic
from ..config import Tuning
from ..constants import Event, Meta, Role, StreamState
from ..engine.api import EngineAPI
from ..engine.registry import Engine
from ..errors import EngineError, ProxyError, Unavailable
from ..store.base import Store
from .fanout import FanOut
from .feed import EngineFeed
from .health import Health, health_of
from .idle import IdleCheck
from .lease import OwnerLease, Renewal
from .player import PlayerInfo, PlayerProducer
from .players import Players
from .tail import BufferTail
from .window import ChunkWindow
from .writer import StoreWriter

_LIVE_STATES = frozenset({StreamState.STARTED, StreamState.UNHEALTHY, StreamState.RECONNECTING})


@attrs.define(eq=False)
class Stream(MultiService):
    """
    @ivar param: the query parameter name the first player used (C{infohash}
        or C{id}); the engine is asked with the same name.
    @ivar choose_engine: picks the engine for a new playback session.
    @ivar find_engine: the configured engine with a given id, if any.
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
    started_at: float = 0.0
    tasks: Tasks = attrs.field(init=False)
    fanout: FanOut = attrs.field(init=False)
    lease: OwnerLease = attrs.field(init=False)
    players: Players = attrs.field(init=False)
    idle: IdleCheck = attrs.field(init=False)
    _ready: Failure | bool = attrs.field(default=False, init=False)
    _waiters: list = attrs.field(factory=list, init=False)
    _starting: Deferred | None = attrs.field(default=None, init=False)
    _stopped: Deferred | None = attrs.field(default=None, init=False)
    _why: tuple = attrs.field(default=("stopped", False), init=False)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.setName(self.key)
        self.started_at = self.clock.seconds()
        self.tasks = Tasks(self.log, self.clock, f"stream {self.key}")
        window = ChunkWindow(self.tuning.buffer_chunks, self.tuning.chunk_ttl)
        self.fanout = FanOut(window, self.tuning.join_chunks)
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
        periodic(
            self.tuning.owner_lease / 3, self._lease_tick, self.clock, self.tasks
        ).setServiceParent(self)

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
            self._swap(self._feed(engine))
            start = self._start_owner(takeover)
        else:
            self._swap(self._tail())
            start = self._start_follower()
        self._starting = self.tasks.run(start)

    def _feed(self, engine: Engine | None, reconnects: int = 0) -> EngineFeed:
        writer = StoreWriter(self.key, self.store, self.clock, self.fanout, self.lease.safe)
        return EngineFeed(
            self.key,
            self.param,
            self.api,
            self.clock,
            self.tuning,
            self.fanout,
            writer,
            self.tasks,
            self.choose_engine,
            self.find_engine,
            self.write_metadata,
            self.stop,
            engine=engine,
            reconnects=reconnects,
        )

    def _tail(self, next_index: int | None = None) -> BufferTail:
        return BufferTail(
            self.key,
            self.store,
            self.clock,
            self.fanout,
            self.tasks,
            self.tuning.join_chunks,
            self.tuning.first_byte_timeout,
            next_index=next_index,
        )

    def _swap(self, source: EngineFeed | BufferTail) -> None:
        """
        Make C{source} the stream's data source, stopping the one before.
        """
        if self.source is not None:
            self.tasks.run(self.source.disownServiceParent())
        self.source = source
        source.setServiceParent(self)

    async def _start_owner(self, takeover: dict | None) -> None:
        try:
            await self.source.open(takeover, self._put_metadata)
        except Exception as e:
            return self._start_failed(e)
        finally:
            self._starting = None
        await self._now_owning("started", Event.STREAM_STARTED)
        self._open_to_players()

    async def _start_follower(self) -> None:
        try:
            await self.source.open()
        except Exception as e:
            return self._start_failed(e)
        finally:
            self._starting = None
        self.log.info("stream {key}: following its owner's buffer", key=self.key)
        self._open_to_players()

    async def _now_owning(self, how: str, event: Event) -> None:
        """
        The engine's data flows to this owner: record it and tell the other
        workers.
        """
        await self._put_metadata()
        self.log.info(
            "stream {key} {how} on {engine} ({session})",
            key=self.key,
            how=how,
            engine=self.engine.id,
            session=self.source.playback.playback_session_id,
        )
        self.players.publish(event, engine=self.engine.id)

    def _open_to_players(self) -> None:
        self._set_ready(True)
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
        self._set_ready(Failure(error))
        self.stop("start failed")

    def _set_ready(self, result: Failure | bool) -> None:
        self._ready = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    def wait_ready(self) -> Deferred:
        """
        Fire when the stream has data for players, or fail with the
        L{ProxyError} that stopped it.  Cancelling one waiter leaves the
        others and the stream alone.
        """
        if isinstance(self._ready, Failure):
            return fail(self._ready)
        if self._ready:
            return succeed(None)
        waiter = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        return waiter

    # Players

    def add_player(self, info: PlayerInfo, request) -> PlayerProducer:
        self.idle.player_joined()
        return self.players.add(info, request)

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
        elif kind == Event.OWNER_CHANGED and not mine and event.get("handover"):
            self.clock.callLater(0, lambda: self.tasks.run(self._lease_tick))

    # The lease: this is its one driver

    async def _lease_tick(self) -> None:
        """
        Owner: renew the lease (keeping the stream's keys alive, and its
        metadata up to date), even while starting, so that a slow engine
        does not let another worker take the stream too.  Follower: take
        the stream over when its owner is gone.  While the store is down
        nothing is asked of it: the owner goes on serving its own players,
        and the lease is settled when it is back.
        """
        if self.stopping or not self.store.available:
            return
        if self.role is Role.FOLLOWER:
            if self._starting is None and await self.lease.take_if_orphaned():
                await self._promote()
            return
        renewal = await self.lease.renew()
        if renewal is Renewal.LOST:
            if self._starting is None and not self.stopping:
                await self._demote()
            return
        if self.stopping:
            await self.lease.release()
            return
        if renewal is Renewal.RETAKEN:
            self.log.warn("stream {key}: its keys were lost; restoring them", key=self.key)
            await self.players.restore()
        self.source.writer.flush()
        if self.live:
            await self._put_metadata()

    async def _demote(self) -> None:
        """
        Another worker holds the lease now: follow the buffer from the chunk
        after the last one our players got.  Our engine session is the new
        owner's to use if the metadata names it; if not, the new owner
        opened its own and ours would play to nobody, so it is stopped.
        """
        self.log.warn("stream {key}: lost ownership; following", key=self.key)
        feed = self.source
        self._swap(self._tail(self.fanout.last_index + 1))
        self.source.state = StreamState.STARTED
        if feed.playback is None:
            return
        meta = await self.store.get_stream(self.key) or {}
        if meta.get(Meta.PLAYBACK_SESSION_ID) != feed.playback.playback_session_id:
            await feed.stop_engine()

    async def _promote(self) -> None:
        """
        The owner's lease lapsed and is ours now: read what it left in the
        buffer, then open the engine (reusing its session when it still
        plays) and write the buffer on from there.  It runs as the stream's
        start, so that stopping cancels it.
        """
        self.log.warn("stream {key}: the owner is gone; taking the stream over", key=self.key)
        self._starting = self.tasks.run(self._take_over())

    async def _take_over(self) -> None:
        try:
            await self.source.read_new()
            tail = self.source
            self._swap(self._feed(None, reconnects=1))
            meta = await self.store.get_stream(self.key)
            await self.source.open(meta, self._put_metadata)
        except CancelledError:
            if self.role is Role.FOLLOWER or tail is self.source:
                # Stopped before it owned anything: stopping a follower
                # leaves the lease alone, so give it back here.
                self.tasks.run(self.lease.release(), keep=True)
            return
        except Exception as e:
            self.log.warn("stream {key}: takeover failed: {why}", key=self.key, why=e)
            self.stop("takeover failed")
            return
        finally:
            self._starting = None
        await self._now_owning("taken over", Event.OWNER_CHANGED)

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
            Deferred.fromCoroutine(self._stop(*self._why)).chainDeferred(self._stopped)
        return self._stopped

    async def _stop(self, why: str, handover: bool) -> None:
        self.log.info("stream {key} stopping: {why}", key=self.key, why=why)
        owner = self.role is Role.OWNER
        self.idle.cancel()
        self.tasks.cancel_all()
        if not self._ready:
            self._set_ready(Failure(EngineError(f"stream {self.key} stopped: {why}")))
        await MultiService.stopService(self)
        self.players.finish_all()
        self.fanout.window.clear()
        self.store.unlisten(self.key, self._event)
        if owner:
            await (self._hand_over() if handover else self._end())
        await self.tasks.settle()
        self.log.info("stream {key} stopped", key=self.key)

    async def _hand_over(self) -> None:
        try:
            if not self.store.available:
                raise Unavailable("the store is down")
            await self.lease.release()
            await self.store.publish(self.key, Event.OWNER_CHANGED.value, handover=True)
        except Unavailable:
            self.log.warn("stream {key}: could not hand over, Redis is down", key=self.key)

    async def _end(self) -> None:
        """
        Tell the other workers, delete the keys, stop the engine session.
        With Redis down the keys are left to expire rather than have the
        engine wait for the store's timeout.
        """
        try:
            if not self.store.available:
                raise Unavailable("the store is down")
            await self.store.publish(self.key, Event.STREAM_STOPPING.value)
            await self.store.delete_stream(self.key)
        except Unavailable:
            self.log.warn("stream {key}: could not delete its keys, Redis is down", key=self.key)
        except Exception:
            self.log.failure("stream {key}: could not delete its keys", key=self.key)
        await self.source.stop_engine()

    # Metadata

    async def _put_metadata(self) -> None:
        """
        Write the metadata; while an owner starts, a store that is down
        fails the start.
        """
        try:
            await self.store.put_stream(self.key, self.metadata())
        except Unavailable:
            if self.role is Role.OWNER and self._starting is not None:
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
        source = self.source
        fields = {
            Meta.KEY: self.key,
            Meta.STATE: self.state.value,
            Meta.PARAM: self.param,
            Meta.OWNER: self.worker_id,
            Meta.STARTED_AT: self.started_at,
            Meta.BYTES_IN: self.bytes_in,
            Meta.RECONNECTS: getattr(source, "reconnects", 0),
            Meta.HEALTH: self.health.value,
        }
        if self.engine is not None:
            fields[Meta.ENGINE_ID] = self.engine.id
            fields[Meta.ENGINE_URL] = self.engine.url
        if self.last_data_at is not None:
            fields[Meta.LAST_DATA_AT] = self.last_data_at
        playback = getattr(source, "playback", None)
        if playback is not None:
            fields.update(
                {
                    Meta.PLAYBACK_URL: playback.playback_url,
                    Meta.STAT_URL: playback.stat_url,
                    Meta.COMMAND_URL: playback.command_url,
                    Meta.PLAYBACK_SESSION_ID: playback.playback_session_id,
                    Meta.IS_LIVE: playback.is_live,
                }
            )
        return {str(k): v for k, v in fields.items()}
