"""
The worker's streams: one L{Stream} per stream key however many
players ask for it, the engine chosen for each new stream, and the
inspection data the web API shows.
"""

import uuid
from collections import Counter
from collections.abc import Collection

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.logger import Logger

from ..background import Tasks, periodic
from ..config import Tuning
from ..constants import ACTIVE_STATES, Event, Meta, PlayerField, Role
from ..engine.api import EngineAPI
from ..engine.registry import Engine, EngineRegistry
from ..errors import NoEngine, NotFound, Unavailable
from ..hls.viewer import HlsViewer, viewer_id
from ..metrics import DROPPED_LIMIT, Metrics
from ..store.base import RETRY_AFTER, Store
from .heartbeat import PlayerHeartbeats
from .player import PlayerInfo
from .stream import Stream
from .window import WindowBudget

#: Seconds a shutdown waits for players' last bytes to leave.
SHUTDOWN_DRAIN = 5.0

#: Retry-After (seconds) when a limit refuses a player.
LIMIT_RETRY_AFTER = 10

#: Retry-After (seconds) while shutting down: a restart is usually quick.
SHUTDOWN_RETRY_AFTER = 5

#: Retry-After (seconds) when no engine is healthy: an engine that is
#: starting is usually up within seconds, and the next request probes it.
NO_ENGINE_RETRY_AFTER = 5

#: Seconds a new player waits for a store whose connection is being made;
#: one that is down refuses it at once.
STORE_WAIT = 0.75


@attrs.define(eq=False)
class StreamRegistry(MultiService):
    """
    Owns the streams of this worker (its children, named by key) and the
    timers that keep them healthy (engine probes, player heartbeats).

    @ivar metrics: the worker's metrics, handed to every stream.
    """

    log = Logger()

    store: Store
    engines: EngineRegistry
    api: EngineAPI
    clock: object
    tuning: Tuning
    worker_id: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    metrics: Metrics = attrs.field(factory=Metrics)
    streams: dict = attrs.field(factory=dict, init=False)
    accepting: bool = attrs.field(default=True, init=False)
    heartbeats: PlayerHeartbeats = attrs.field(init=False)
    tasks: Tasks = attrs.field(init=False)
    _stopping: dict = attrs.field(factory=dict, init=False)
    _create_lock: DeferredLock = attrs.field(factory=DeferredLock, init=False)
    #: Shared by every stream's window, so that together they stay within
    #: C{tuning.max_buffer_bytes}.
    budget: WindowBudget = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.tasks = Tasks(self.log, self.clock, "the stream registry")
        self.budget = WindowBudget(self.tuning.max_buffer_bytes)
        self.heartbeats = PlayerHeartbeats(
            self.store,
            self.clock,
            lambda: self.streams.values(),
            self.tuning.heartbeat_interval,
            self.tuning.ghost_client_timeout,
        )
        for interval, call in (
            (self.tuning.probe_interval, self.engines.probe),
            (self.tuning.heartbeat_interval, self.heartbeats.tick),
            (self.tuning.worker_timeout / 3, self._alive),
        ):
            periodic(interval, call, self.clock, self.tasks).setServiceParent(self)

    # Players

    async def attach(self, key: str, param: str, request) -> Deferred:
        """
        Attach the player of C{request} to stream C{key}, starting the stream
        if this worker has no stream for it.  Fire with a L{Deferred} that
        fires when the player's response should end.
        """
        asked_at = self.clock.seconds()
        stream = await self._joinable(key, param)
        info = self._player_info(uuid.uuid4().hex, key, *self._client(request))
        producer = stream.add_player(info, request)
        self._time_join(producer, stream, asked_at)
        return producer.done

    async def watch(self, key: str, param: str | None, request) -> tuple[Stream, HlsViewer]:
        """
        The stream C{key} and the HLS viewer of C{request} on it, counted as
        a player from its first request on.  With no C{param}, the request
        is for a segment: it joins a stream that plays (in this worker or
        another), but starts none.
        """
        address, user_agent = self._client(request)
        player_id = viewer_id(key, address, user_agent)
        stream = self.streams.get(key)
        if stream is not None and stream.live:
            viewer = stream.players.viewers.get(player_id)
            if viewer is not None:
                return stream, viewer
        if param is None and stream is None:
            meta = await self.store.get_stream(key) if self.store.available else None
            if meta is None:
                raise NotFound(f"no stream {key}")
            param = meta.get(Meta.PARAM) or "id"
        stream = await self._joinable(key, param)
        viewer = stream.players.viewers.get(player_id)
        if viewer is None:
            viewer = stream.add_viewer(self._player_info(player_id, key, address, user_agent))
        return stream, viewer

    async def _joinable(self, key: str, param: str) -> Stream:
        """
        Stream C{key}, started if this worker has none, once it has data
        for players and room for one more.
        """
        if not self.accepting:
            raise Unavailable("the proxy is shutting down", retry_after=SHUTDOWN_RETRY_AFTER)
        # The player could not be registered, nor a stream started: refuse it
        # now rather than after the store's command timeout.
        if not self.store.available and not await self.store.when_available(STORE_WAIT):
            raise Unavailable(
                f"the {self.store.kind} store is unavailable", retry_after=RETRY_AFTER
            )
        self._check_max_clients()
        stream = self.streams.get(key)
        if stream is None:
            # Probed here, before the stream's creation holds its lock and
            # owner lease, when no engine is healthy.
            await self._probe_if_none_healthy()
            stream = await self._create(key, param)
        await stream.wait_ready()
        registered = await self.store.count_players(key)
        # Nothing may wait between here and adding the player: the stream
        # could stop in between, and the players that waited for the stream
        # to start with this one could take the last places.
        if self.streams.get(key) is not stream:
            raise Unavailable(f"stream {key} stopped", retry_after=LIMIT_RETRY_AFTER)
        self._check_max_clients()
        # This worker's players are counted here and now; the store's count
        # of them may lag (their registration is not awaited).
        if max(registered, len(stream.players)) >= self.tuning.max_clients_per_stream:
            raise self._refused("too many players on this stream")
        return stream

    @staticmethod
    def _client(request) -> tuple[str, str]:
        """The address and user agent of C{request}'s client."""
        address = request.getClientAddress()
        return (
            getattr(address, "host", str(address)),
            (request.getHeader(b"user-agent") or b"").decode("latin-1")[:256],
        )

    def _player_info(self, player_id: str, key: str, address: str, user_agent: str) -> PlayerInfo:
        return PlayerInfo(
            id=player_id,
            key=key,
            address=address,
            user_agent=user_agent,
            connected_at=self.clock.seconds(),
        )

    def _time_join(self, producer, stream: Stream, asked_at: float) -> None:
        """
        Observe, in the worker's join histogram, how long the player waited
        from its request to its first byte: sent already by the player's
        start (it began a few chunks behind live), or else with the next
        chunk the stream delivers.
        """
        histogram = self.metrics.join_seconds
        if producer.bytes_sent:
            histogram.observe(self.clock.seconds() - asked_at)
            return

        def first(chunk):
            if producer.bytes_sent:
                histogram.observe(self.clock.seconds() - asked_at)

        stream.fanout.next_chunk().addCallback(first)

    def _refused(self, why: str) -> Unavailable:
        """
        The refusal of a player at a limit, counted as a dropped player.
        """
        self.metrics.players_dropped.labels(reason=DROPPED_LIMIT).inc()
        return Unavailable(why, retry_after=LIMIT_RETRY_AFTER)

    def _check_max_clients(self) -> None:
        if sum(len(s.players) for s in self.streams.values()) >= self.tuning.max_clients:
            raise self._refused("too many players on this proxy")

    async def _check_max_streams(self, key: str) -> None:
        """
        Refuse a new stream past C{max_streams}.  A stream that another
        worker plays is no new stream: joining it costs no engine stream.
        This worker's streams count even before their metadata is stored.
        """
        streams = await self.store.list_streams()
        active = {s.get(Meta.KEY) for s in streams if s.get(Meta.STATE) in ACTIVE_STATES}
        active.update(self.streams)
        if key not in active and len(active) >= self.tuning.max_streams:
            raise self._refused("too many streams")

    async def _create(self, key: str, param: str) -> Stream:
        """
        Start this worker's stream C{key}: as its owner when the owner lease
        is free (choosing an engine, or taking over the session a previous
        owner left), else as a follower of the owner's buffer.  Creations
        are serialised so that simultaneous requests for one key make one
        stream, and simultaneous new streams see each other's load and
        count towards C{max_streams}.
        """
        earlier = self._stopping.get(key)
        if earlier is not None:
            # Its cleanup deletes the stream's keys: let it finish first.
            await _settled(earlier)
        await self._create_lock.acquire()
        try:
            stream = self.streams.get(key)
            if stream is not None:
                return stream
            await self._check_max_streams(key)
            # Before it may own a stream, others must see this worker alive,
            # or they would take the stream from it at once.
            await self._alive()
            asked_at = self.clock.seconds()
            owner = await self.store.acquire_owner(key)
            try:
                takeover = await self.store.get_stream(key) if owner else None
                engine = await self.choose_engine() if owner and not takeover else None
            except BaseException:
                # No engine, or the join was cancelled: nobody holds the
                # stream, so the lease must not wait out its time.
                if owner:
                    self.tasks.run(self.store.release_owner(key), keep=True)
                raise
            stream = Stream(
                key=key,
                param=param,
                api=self.api,
                store=self.store,
                clock=self.clock,
                tuning=self.tuning,
                worker_id=self.worker_id,
                choose_engine=self.choose_engine,
                find_engine=self.engines.by_id,
                budget=self.budget,
                metrics=self.metrics,
            )
            self.streams[key] = stream
            self.log.info(
                "stream {key}: starting as {role}{on}",
                key=key,
                role="owner" if owner else "follower",
                on=f" on engine {engine.id}" if engine else "",
            )
            stream.start(owner, asked_at, engine, takeover)
            # Its timers start now, with its source in place.
            stream.setServiceParent(self)
            return stream
        finally:
            self._create_lock.release()

    async def choose_engine(self, exclude: Collection[str] = ()) -> Engine:
        """
        The engine for a new playback stream, by the selection rule,
        avoiding the engines in C{exclude} while others are healthy.
        """
        await self._probe_if_none_healthy()
        engine = self.engines.select(await self.engine_loads(), exclude)
        if engine is None:
            raise NoEngine(
                f"no healthy engine: {self.engines.problems()}",
                retry_after=NO_ENGINE_RETRY_AFTER,
            )
        return engine

    async def _probe_if_none_healthy(self) -> None:
        """
        With no healthy engine, probe the engines now instead of leaving the
        player to the next periodic probe: an engine that came up since
        serves at once.  One probe per engine is in flight at a time,
        whatever the number of players asking.
        """
        if not self.engines.healthy():
            await self.engines.probe_unhealthy()

    async def engine_loads(self) -> Counter:
        """
        Active streams per engine id, as every worker sees them.
        """
        streams = await self.store.list_streams()
        return Counter(s.get(Meta.ENGINE_ID) for s in streams if s.get(Meta.STATE) in ACTIVE_STATES)

    # Stopping streams

    async def stop_stream(self, key: str, why: str) -> bool:
        """
        Stop stream C{key}, whichever worker owns it: true once it stopped
        here, false when its owner, another worker, was asked to.
        """
        stream = self.streams.get(key)
        if stream is not None and stream.role is Role.OWNER:
            await stream.stop(why)
            return True
        if stream is None and await self.store.get_stream(key) is None:
            raise NotFound(f"no stream {key}")
        await self.store.publish(key, Event.STOP_REQUESTED.value, why=why)
        return False

    def removeService(self, service):
        """
        A stream began to stop (it disowned itself): new players of its key
        get a new stream, which starts once this one's cleanup is done.
        """
        removed = MultiService.removeService(self, service)
        if isinstance(service, Stream):
            key = service.key
            if self.streams.get(key) is service:
                del self.streams[key]
            stopped = self._stopping[key] = service.stopService()

            def forget(result):
                if self._stopping.get(key) is stopped:
                    del self._stopping[key]
                return result

            stopped.addBoth(forget)
        return removed

    def stopService(self):
        """
        Refuse new players, stop every stream (players get a clean end, the
        engines are told to stop), close the players' connections once their
        last bytes are out, then stop the helper services.
        """
        self.accepting = False
        transports = [
            player.request.transport
            for stream in self.streams.values()
            for player in stream.players
            if not isinstance(player, HlsViewer)
        ]
        streams = list(self.streams.values())
        d = DeferredList(
            [Deferred.fromCoroutine(self._shut_down(s)) for s in streams]
            + list(self._stopping.values()),
            consumeErrors=True,
        )
        d.addCallback(lambda _: self._close(transports))
        d.addCallback(lambda _: self.tasks.cancel_all())
        d.addCallback(lambda _: MultiService.stopService(self))
        d.addCallback(lambda _: Deferred.fromCoroutine(self._gone()))
        return d

    async def _alive(self) -> None:
        """
        Tell the other workers this one runs (a liveness key that expires
        after C{worker_timeout}): when it dies, they take its streams over
        and drop its players without waiting for leases and heartbeats.
        """
        if self.store.available:
            await self.store.mark_alive(self.tuning.worker_timeout)

    async def _gone(self) -> None:
        if not self.store.available:
            return
        try:
            await self.store.mark_gone()
        except Unavailable:
            pass

    async def _shut_down(self, stream: Stream) -> None:
        """
        Stop one stream for shutdown; an owner whose stream still has players
        on other workers hands it over instead of ending it.
        """
        handover = False
        if stream.role is Role.OWNER and stream.live and self.store.available:
            try:
                clients = await self.store.list_players(stream.key)
            except Unavailable:
                clients = {}
            handover = any(
                fields.get(PlayerField.WORKER) not in (None, self.worker_id)
                for fields in clients.values()
            )
            # An HLS viewer's requests may reach any worker, and its one
            # record names only the worker that wrote it last: the others
            # serving it cannot be told from the store.  Its next request
            # comes within a segment, to a worker that takes the stream
            # over and numbers its segments on; ended, the stream would
            # start again on a new engine session, numbered from 0.
            handover = handover or (self.store.shared and bool(stream.players.viewers))
        await stream.stop("shutting down", handover=handover)

    def _close(self, transports: list) -> Deferred:
        """
        Close connections after their buffered bytes are sent, and fire when
        they are closed (or after L{SHUTDOWN_DRAIN} seconds, whichever is first):
        the reactor's own shutdown would drop unsent bytes.

        A transport that paused its producer (the HTTP channel) because its
        player's socket was full does not close once it has drained: it
        resumes the producer and waits for it to write, which it never does.
        Unregistered, the producer cannot hold the connection open.
        """
        for transport in transports:
            transport.unregisterProducer()
            transport.loseConnection()
        deadline = self.clock.seconds() + SHUTDOWN_DRAIN
        done = Deferred()

        def check() -> None:
            open_ = [t for t in transports if getattr(t, "connected", False)]
            if not open_ or self.clock.seconds() >= deadline:
                done.callback(None)
            else:
                self.clock.callLater(0.02, check)

        check()
        return done


def _settled(d: Deferred) -> Deferred:
    """
    A new L{Deferred} that fires (with L{None}) when C{d} has, leaving
    C{d}'s own result to its other callbacks.
    """
    settled = Deferred()

    def fire(result):
        settled.callback(None)
        return result

    d.addBoth(fire)
    return settled
