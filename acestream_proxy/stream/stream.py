"""
One stream's life in one worker.

The worker that holds the stream's owner lease is its I{owner}: it opens the
playback session on an engine, reads the body into the shared ring buffer and
its local fan-out, renews the lease, and stops everything (engine session and
keys included) once no worker has had a player for C{cleanup_grace} seconds.

Any other worker with players for the stream is a I{follower}: it reads each
new chunk from the ring buffer once (woken by C{chunk_added}, with a short
poll as a safety net) and fans it out to its own players.  When the owner's
lease lapses (the owner died, or handed the stream over), a follower takes
the lease and becomes the owner, continuing the buffer's index.

While Redis is down the owner goes on reading the engine and serving its own
players (followers have nothing to read); when Redis is back, empty, the
owner takes its lease again and writes the stream's keys back, and followers
notice that the buffer began afresh.  An owner appends only while its lease
is surely its own: one that stood still past its lease (a frozen process)
holds its chunks until the lease tick renews the lease or finds it taken and
steps down, so that the buffer is written by one owner at a time.

With the embedded store there is only ever one worker, the owner.
"""

import random
from collections import deque
from enum import StrEnum
from typing import Awaitable, Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import Tuning
from ..constants import Event, Meta, PlayerField, StreamState
from ..engine.api import EngineAPI, Playback
from ..engine.reader import EngineReader
from ..engine.registry import Engine
from ..errors import EngineError, EngineTimeout, ProxyError, Unavailable
from ..store.base import Store
from .fanout import FanOut
from .health import Backoff, Health, Verdict, check_interval, judge_silence
from .player import PlayerInfo, PlayerProducer
from .window import Chunk, ChunkWindow, frame

#: Chunks that may wait for the store before the engine's transport is paused.
MAX_PENDING_APPENDS = 8

#: Seconds between a follower's safety polls of the ring buffer.
FOLLOW_POLL = 0.5

#: Most chunks a follower reads in one round trip.
READ_BATCH = 50


_LIVE_STATES = frozenset(
    {StreamState.STARTED, StreamState.UNHEALTHY, StreamState.RECONNECTING}
)


class Role(StrEnum):
    OWNER = "owner"
    FOLLOWER = "follower"


@attrs.define(eq=False)
class Stream:
    """
    @ivar param: the query parameter name the first player used (C{infohash}
        or C{id}); the engine is asked with the same name.
    @ivar choose_engine: picks the engine for a new playback session.
    @ivar find_engine: the configured engine with a given id, if any.
    @ivar on_stopping: called once, as the session begins to stop, with the
        session and a L{Deferred} that fires when it is over.
    """

    log = Logger()

    key: str
    param: str
    role: Role
    api: EngineAPI
    store: Store
    clock: object
    tuning: Tuning
    worker_id: str
    choose_engine: Callable[..., Awaitable[Engine]]
    find_engine: Callable[[str], Engine | None]
    on_stopping: Callable[["Stream", Deferred], None]
    engine: Engine | None = None
    state: StreamState = StreamState.STARTING
    playback: Playback | None = None
    started_at: float = 0.0
    last_data_at: float | None = None
    reconnects: int = 0
    follower: FanOut = attrs.field(init=False)
    players: set = attrs.field(factory=set, init=False)
    _reader: EngineReader | None = attrs.field(default=None, init=False)
    _starting: Deferred | None = attrs.field(default=None, init=False)
    _first_data: Deferred | None = attrs.field(default=None, init=False)
    _data_arrived: Deferred | None = attrs.field(default=None, init=False)
    _ready: Failure | bool = attrs.field(default=False, init=False)
    _waiters: list = attrs.field(factory=list, init=False)
    _cleanup_call: object = attrs.field(default=None, init=False)
    _unstored: deque = attrs.field(factory=deque, init=False)
    _appending: bool = attrs.field(default=False, init=False)
    _last_index: int = attrs.field(default=0, init=False)
    _next_index: int | None = attrs.field(default=None, init=False)
    _fetching: bool = attrs.field(default=False, init=False)
    _fetch_again: bool = attrs.field(default=False, init=False)
    _lease_loop: LoopingCall | None = attrs.field(default=None, init=False)
    _poll_loop: LoopingCall | None = attrs.field(default=None, init=False)
    _orphaned_at: float | None = attrs.field(default=None, init=False)
    _leasing: bool = attrs.field(default=False, init=False)
    _lease_until: float = attrs.field(default=0.0, init=False)
    _stopped: Deferred | None = attrs.field(default=None, init=False)
    health: Health = attrs.field(default=Health.HEALTHY, init=False)
    _health_loop: LoopingCall | None = attrs.field(default=None, init=False)
    _reconnecting: Deferred | None = attrs.field(default=None, init=False)
    #: Draws the jitter of reconnection delays; tests make it predictable.
    jitter: Callable[[], float] = random.random

    def __attrs_post_init__(self) -> None:
        window = ChunkWindow(self.tuning.buffer_chunks, self.tuning.chunk_ttl)
        self.follower = FanOut(window, self.tuning.join_chunks)
        self.started_at = self.clock.seconds()

    @property
    def bytes_in(self) -> int:
        return self._reader.bytes_in if self._reader is not None else 0

    @property
    def live(self) -> bool:
        """
        Serving players: started, and not stopping (it may be unhealthy or
        reconnecting).
        """
        return self.state in _LIVE_STATES and not self.stopping

    @property
    def stopping(self) -> bool:
        return self._stopped is not None

    # Starting

    def start(self, takeover: dict | None = None) -> None:
        """
        Begin serving: as owner, open the engine session (reusing the one in
        C{takeover}, the metadata a previous owner left, when it still
        plays); as follower, start reading the ring buffer.  Players wait
        with L{wait_ready}.
        """
        self.store.listen(self.key, self._event)
        # An owner's lease was taken just now, by the server.
        self._lease_until = self.clock.seconds() + self.tuning.owner_lease
        self._lease_loop = self._loop(self._lease_tick, self.tuning.owner_lease / 3)
        self._health_loop = self._loop(self._check_health, check_interval(self.tuning))
        if self.role is Role.OWNER:
            self._starting = Deferred.fromCoroutine(self._start_owner(takeover))
        else:
            self._starting = Deferred.fromCoroutine(self._start_follower())

    def _loop(self, f, interval: float) -> LoopingCall:
        loop = LoopingCall(f)
        loop.clock = self.clock
        loop.start(interval, now=False).addErrback(
            lambda failure: self.log.failure("stream {key}: timer failed", failure, key=self.key)
        )
        return loop

    async def _start_owner(self, takeover: dict | None) -> None:
        if await self._opened(self._open_engine(takeover)):
            await self._now_owning("started", Event.STREAM_STARTED)
            self._open_to_players()

    async def _opened(self, opening) -> bool:
        """
        Await a start's opening step, until the stream's first data: true
        when it got there; on failure the start is abandoned and the
        stream stopped (a cancel means stop() is already doing that).
        """
        try:
            await opening
            await self._wait_first_data(
                None if self.role is Role.OWNER else f"stream {self.key}"
            )
        except CancelledError:
            self._starting = None
            return False
        except Exception as e:
            self._start_failed(e)
            return False
        return True

    def _open_to_players(self) -> None:
        self._set_ready(True)
        if not self.players:
            self._player_gone()

    async def _now_owning(self, how: str, event: Event) -> None:
        """
        The engine's data flows to this owner: record it and tell the other
        workers.
        """
        self._starting = None
        self.state = StreamState.STARTED
        await self._put_metadata()
        self.log.info(
            "stream {key} {how} on {engine} ({session})",
            key=self.key,
            how=how,
            engine=self.engine.id,
            session=self.playback.playback_session_id,
        )
        self._publish(event, engine=self.engine.id)

    async def _open_engine(self, takeover: dict | None) -> None:
        """
        Open the playback body, on the session a previous owner left when it
        still plays, else on a new session of the chosen engine.
        """
        if takeover and await self._reuse(takeover):
            return
        if self.engine is None:
            self.engine = await self.choose_engine()
        await self._put_metadata()
        self.playback = await self.api.getstream(self.engine, self.key, self.param)
        await self._put_metadata()
        response = await self.api.open_playback(self.engine, self.playback)
        self._read(response)

    async def _reuse(self, meta: dict) -> bool:
        engine = self.find_engine(meta.get(Meta.ENGINE_ID, ""))
        try:
            playback = Playback(
                playback_url=meta[Meta.PLAYBACK_URL],
                stat_url=meta[Meta.STAT_URL],
                command_url=meta[Meta.COMMAND_URL],
                playback_session_id=meta.get(Meta.PLAYBACK_SESSION_ID, ""),
                is_live=int(meta.get(Meta.IS_LIVE) or 1),
            )
        except (KeyError, ValueError):
            return False
        if engine is None or not engine.healthy:
            return False
        try:
            response = await self.api.open_playback(engine, playback)
        except ProxyError as e:
            self.log.info(
                "stream {key}: the previous engine session no longer plays ({why})",
                key=self.key,
                why=e.message,
            )
            return False
        self.engine, self.playback = engine, playback
        self.reconnects = int(float(meta.get(Meta.RECONNECTS) or 0))
        self._read(response)
        return True

    def _read(self, response) -> None:
        self._first_data = self._data_arrived = Deferred()
        self._reader = EngineReader(
            self._on_data, self._on_end, key=self.key, engine=self.engine.id
        )
        response.deliverBody(self._reader)

    async def _wait_first_data(self, what: str | None = None) -> None:
        try:
            await self._data_arrived.addTimeout(self.tuning.first_byte_timeout, self.clock)
        except TimeoutError:
            raise EngineTimeout(f"{what or 'engine ' + self.engine.id} sent no data in time")

    async def _start_follower(self) -> None:
        if await self._opened(self._follow()):
            self._starting = None
            self.state = StreamState.STARTED
            self.log.info("stream {key}: following its owner's buffer", key=self.key)
            self._open_to_players()

    async def _follow(self) -> None:
        latest = await self.store.buffer.latest(self.key)
        if latest:
            self._next_index = max(1, latest - self.tuning.join_chunks + 1)
        self._first_data = self._data_arrived = Deferred()
        self._poll_loop = self._loop(self._fetch, FOLLOW_POLL)
        await self._fetch()

    def _start_failed(self, e: Exception) -> None:
        self._starting = None
        if isinstance(e, ProxyError):
            error = e
            self.log.warn(
                "stream {key} failed to start: {why}", key=self.key, why=e.message
            )
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
        others and the session alone.
        """
        if isinstance(self._ready, Failure):
            return fail(self._ready)
        if self._ready:
            return succeed(None)
        waiter = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        return waiter

    # Data: from the engine (owner) or the ring buffer (follower)

    def _on_data(self, packets: bytes) -> None:
        now = self.clock.seconds()
        self.last_data_at = now
        if self.health is Health.UNHEALTHY:
            self._healthy_again()
        # Framed once, here; the store and the fan-out share these bytes.
        framed, start = frame(packets)
        self._unstored.append((framed, start, now))
        if len(self._unstored) > MAX_PENDING_APPENDS:
            self._reader.pause()
        self._store_next()

    def _store_next(self) -> None:
        """
        Append the oldest chunk not yet stored.  One append at a time: the
        store may send two commands down different connections, and Redis
        would then number the chunks in whichever order it read them.
        While the store is down the chunks go to this worker's players at
        once, numbered locally, rather than wait for a timeout.
        """
        if self._appending or not self._unstored:
            return
        if not self.store.available:
            while self._unstored:
                self._publish_local(*self._unstored.popleft())
            self._resume_reader()
            return
        if self.clock.seconds() > self._lease_until - self.tuning.owner_lease / 3:
            # Our lease may have lapsed (this process stood still, say): an
            # append now could land after another owner's.  The chunks wait
            # for the lease tick, which is due, to renew it or step down.
            return
        framed, start, _ = self._unstored[0]
        self._appending = True
        d = self.store.buffer.append(self.key, memoryview(framed)[start:-2])
        d.addCallbacks(self._appended, self._append_failed)

    def _stored(self) -> tuple[bytes, int, float]:
        """
        The oldest unstored chunk has been dealt with: forget it.
        """
        self._appending = False
        entry = self._unstored.popleft()
        self._resume_reader()
        return entry

    def _resume_reader(self) -> None:
        if len(self._unstored) <= MAX_PENDING_APPENDS // 2 and self._reader is not None:
            self._reader.resume()

    def _appended(self, index: int) -> None:
        framed, start, now = self._stored()
        # A demoted owner's last append is read back from the buffer.
        if self.role is Role.OWNER and not self.stopping:
            self._publish_chunk(Chunk(index, framed, start, now))
        self._store_next()

    def _append_failed(self, failure: Failure) -> None:
        """
        The store could not take the chunk (Redis went down): this worker's
        players still get it.
        """
        self._publish_local(*self._stored())
        if not failure.check(Unavailable):
            self.log.failure("stream {key}: could not store a chunk", failure, key=self.key)
        self._store_next()

    def _publish_local(self, framed: bytes, start: int, now: float) -> None:
        """
        Give a chunk the store did not number to this worker's players,
        numbered after the last one they got.
        """
        if self.role is Role.OWNER and not self.stopping:
            self._publish_chunk(Chunk(self._last_index + 1, framed, start, now))

    def _publish_chunk(self, chunk: Chunk) -> None:
        self._last_index = chunk.index
        self.follower.publish(chunk)
        if self._first_data is not None:
            first, self._first_data = self._first_data, None
            first.callback(None)

    async def _fetch(self, upto: int | None = None) -> None:
        """
        Follower: read the chunks this worker has not seen yet, once, and
        fan them out.  Calls that arrive while a read runs are folded into
        one more round.
        """
        if self.role is not Role.FOLLOWER or self.stopping or not self.store.available:
            return
        if self._fetching:
            self._fetch_again = True
            return
        self._fetching = True
        try:
            while True:
                self._fetch_again = False
                await self._read_new(upto)
                upto = None
                if not self._fetch_again or self.role is not Role.FOLLOWER or self.stopping:
                    break
        except Unavailable:
            pass
        finally:
            self._fetching = False

    async def _read_new(self, upto: int | None) -> None:
        buffer = self.store.buffer
        latest = upto if upto is not None else await buffer.latest(self.key)
        if self._next_index is None:
            if not latest:
                return
            self._next_index = max(1, latest - self.tuning.join_chunks + 1)
        elif upto is None and latest < self._next_index - 1:
            # The index went back: Redis lost the buffer and an owner began
            # it afresh.  What it wrote before we looked is new to us.
            self.log.warn(
                "stream {key}: the buffer restarted at {latest}; following it",
                key=self.key,
                latest=latest,
            )
            self._next_index = max(1, latest - self.tuning.join_chunks + 1)
        while self._next_index <= latest and self.role is Role.FOLLOWER and not self.stopping:
            count = min(READ_BATCH, latest - self._next_index + 1)
            found = await buffer.read(self.key, self._next_index, count)
            if not found:
                # Expired before we read it: carry on from the newest.
                self._next_index = latest
                found = await buffer.read(self.key, latest, 1)
                if not found:
                    return
            now = self.clock.seconds()
            self.last_data_at = now
            for index, data in found:
                self._next_index = index + 1
                self._publish_chunk(Chunk.make(index, data, now))

    def _on_end(self, reason: Failure | None) -> None:
        self.log.warn(
            "stream {key}: engine {engine} ended playback ({why})",
            key=self.key,
            engine=self.engine.id,
            why="end of body" if reason is None else reason.getErrorMessage(),
        )
        self._reader = None
        if self._first_data is not None:
            first, self._first_data = self._first_data, None
            first.errback(EngineError(f"engine {self.engine.id} ended playback before any data"))
            return
        self._reconnect("the engine ended playback")

    # Health and reconnection (owner)

    def _check_health(self) -> None:
        """
        Judge how long the engine has been silent: unhealthy after
        C{no_data_timeout}, reconnect after C{reconnect_after} more.
        """
        if (
            self.role is not Role.OWNER
            or self.state not in (StreamState.STARTED, StreamState.UNHEALTHY)
            or self.stopping
            or self._reconnecting is not None
        ):
            return
        silent = self.clock.seconds() - (self.last_data_at or self.started_at)
        verdict = judge_silence(silent, self.tuning)
        if verdict is Verdict.RECONNECT:
            self._reconnect(f"no data for {silent:.0f}s")
        elif verdict is Verdict.UNHEALTHY and self.health is Health.HEALTHY:
            self.health = Health.UNHEALTHY
            self.state = StreamState.UNHEALTHY
            self.log.warn(
                "stream {key} is unhealthy: no data from engine {engine} for {silent:.0f}s",
                key=self.key,
                engine=self.engine.id,
                silent=silent,
            )
            self._write_metadata()

    def _healthy_again(self) -> None:
        self.health = Health.HEALTHY
        self.state = StreamState.STARTED
        self.log.info("stream {key} is healthy again", key=self.key)
        self._write_metadata()

    def _reconnect(self, why: str) -> None:
        """
        Replace the playback connection, keeping the players': the same
        engine first, then the next by the selection rule, backing off
        between attempts, up to C{max_reconnects}.
        """
        if self._reconnecting is not None or self.stopping or self.role is not Role.OWNER:
            return
        self.log.warn("stream {key}: reconnecting ({why})", key=self.key, why=why)
        self.state = StreamState.RECONNECTING
        self.health = Health.RECONNECTING
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        if self.playback is not None:
            # A reconnection opens a new engine session; end the old one.
            Deferred.fromCoroutine(self._stop_engine(self.engine, self.playback))
            self.playback = None
        self._reconnecting = Deferred.fromCoroutine(self._reconnect_attempts())

    async def _reconnect_attempts(self) -> None:
        backoff = Backoff(self.jitter)
        failed: set[str] = set()
        previous = self.engine
        try:
            for attempt in range(self.tuning.max_reconnects):
                delay = backoff.delay(attempt)
                if delay:
                    await deferLater(self.clock, delay, lambda: None)
                if self.role is not Role.OWNER:
                    return
                self.reconnects += 1
                self._write_metadata()
                engine = None
                try:
                    if attempt == 0 and previous.healthy:
                        engine = previous
                    else:
                        engine = await self.choose_engine(exclude=failed)
                    await self._open_on(engine)
                except ProxyError as e:
                    if self.stopping:
                        # stop() cancelled the attempt, which the engine API
                        # reports as a failed call: another attempt would
                        # bring the stream's keys back.
                        raise CancelledError() from e
                    if engine is not None:
                        failed.add(engine.id)
                    self.log.warn(
                        "stream {key}: reconnection {n} failed: {why}",
                        key=self.key,
                        n=attempt + 1,
                        why=e.message,
                    )
                    continue
                self._reconnecting = None
                self.state = StreamState.STARTED
                self.health = Health.HEALTHY
                self._write_metadata()
                self.log.info(
                    "stream {key}: reconnected on {engine} ({session})",
                    key=self.key,
                    engine=engine.id,
                    session=self.playback.playback_session_id,
                )
                return
        except CancelledError:
            self._reconnecting = None
            return
        self._reconnecting = None
        self.state = StreamState.ERROR
        self.health = Health.ERROR
        self.log.error(
            "stream {key}: giving up after {n} reconnections", key=self.key, n=self.tuning.max_reconnects
        )
        self._write_metadata()
        self.stop(f"no engine could play it after {self.tuning.max_reconnects} reconnections")

    async def _open_on(self, engine: Engine) -> None:
        """
        One reconnection attempt: a new session on C{engine}, read until its
        first data; a failed attempt's session is stopped.
        """
        playback = await self.api.getstream(engine, self.key, self.param)
        try:
            response = await self.api.open_playback(engine, playback)
            self.engine, self.playback = engine, playback
            self._read(response)
            await self._wait_first_data()
        except BaseException:
            if self._reader is not None:
                self._reader.stop()
                self._reader = None
            self._first_data = None
            self.playback = None
            Deferred.fromCoroutine(self._stop_engine(engine, playback))
            raise

    # Events from other workers, and the lease

    def _event(self, event: dict) -> None:
        kind = event.get("event")
        mine = event.get("worker_id") == self.worker_id
        if kind == Event.CHUNK_ADDED and self.role is Role.FOLLOWER and not mine:
            index = event.get("index")
            Deferred.fromCoroutine(self._fetch(index if isinstance(index, int) else None))
        elif kind == Event.PLAYER_DISCONNECTED and self.role is Role.OWNER:
            if event.get("remaining") == 0:
                self._player_gone()
        elif kind == Event.PLAYER_CONNECTED and self.role is Role.OWNER:
            self._cancel_cleanup()
        elif kind == Event.STREAM_STOPPING and not mine and self.role is Role.FOLLOWER:
            self.stop("its owner stopped it")
        elif kind == Event.OWNER_CHANGED and not mine and event.get("handover"):
            self.clock.callLater(0, lambda: Deferred.fromCoroutine(self._lease_tick()))

    async def _lease_tick(self) -> None:
        """
        Owner: renew the lease (keeping the stream's keys alive), even while
        starting, so that a slow engine does not let another worker take the
        stream too.  Follower: take the lease when the owner's has lapsed.
        While the store is down nothing is asked of it: the owner goes on
        serving its own players, and the lease is settled when it is back.
        """
        if self.stopping or not self.store.available:
            return
        try:
            if self.role is Role.OWNER:
                await self._keep_lease()
            elif self._starting is None and await self._owner_gone():
                asked_at = self.clock.seconds()
                if await self.store.acquire_owner(self.key):
                    await self._lease_taken(asked_at)
        except Unavailable:
            pass

    async def _keep_lease(self) -> bool:
        """
        Renew the lease; if it was lost, take it again when free (Redis
        restarted empty) or, once started, become a follower.  True if this
        worker owns the stream now.  One at a time: run twice at once, the
        second would find the lease just retaken by the first and step down
        before its own worker; so while one runs, another call answers false
        (not known to be ours) without asking.
        """
        if self._leasing:
            return False
        self._leasing = True
        asked_at = self.clock.seconds()
        try:
            if await self.store.renew_owner(self.key):
                owned = not self.stopping
            elif await self.store.acquire_owner(self.key):
                owned = await self._retaken()
            else:
                owned = False
                if self._starting is None and not self.stopping:
                    await self._demote()
        finally:
            self._leasing = False
        if owned:
            self._lease_confirmed(asked_at)
        return owned

    def _lease_confirmed(self, asked_at: float) -> None:
        """
        Redis set the lease's expiry after C{asked_at}: it is ours until at
        least a lease later.  Chunks held meanwhile may be stored now.
        """
        self._lease_until = asked_at + self.tuning.owner_lease
        self._store_next()

    async def _retaken(self) -> bool:
        """
        The lease was free and is ours again: write back what Redis lost,
        unless the session is stopping.
        """
        if self.stopping:
            await self.store.release_owner(self.key)
            return False
        await self._restore()
        return True

    async def _owner_gone(self) -> bool:
        """
        Whether a follower should take the stream: its lease is free, and
        either the stream's metadata is there (the owner died or handed
        over) or it has been missing for a whole lease.  Missing metadata
        with a free lease is what a Redis restart looks like, and the owner,
        if alive, writes both back within a third of a lease; taking over
        sooner would start a second engine session.
        """
        if await self.store.get_owner(self.key) is not None:
            self._orphaned_at = None
            return False
        if await self.store.get_stream(self.key) is not None:
            return True
        now = self.clock.seconds()
        if self._orphaned_at is None:
            self._orphaned_at = now
        return now - self._orphaned_at >= self.tuning.owner_lease

    async def _lease_taken(self, asked_at: float) -> None:
        """
        A follower holds the lease now: take the stream over, unless it
        stopped meanwhile.  The takeover runs as this session's start, so
        that stopping cancels it and the lease keeps being renewed.
        """
        self._orphaned_at = None
        if self.stopping:
            await self.store.release_owner(self.key)
            return
        self._lease_until = asked_at + self.tuning.owner_lease
        promoting = Deferred.fromCoroutine(self._promote())
        if not promoting.called:
            self._starting = promoting

    async def _restore(self) -> None:
        """
        The store lost our keys (Redis restarted empty): write the metadata
        and our players again (other workers' heartbeats re-add theirs).
        """
        self.log.warn("stream {key}: its keys were lost; restoring them", key=self.key)
        await self._put_metadata()
        for producer in list(self.players):
            await self.store.add_player(self.key, producer.info.id, self.player_fields(producer))

    async def _demote(self) -> None:
        """
        Another worker holds the lease now: stop reading the engine and
        follow the buffer from the chunk after the last one our players
        got.  Our engine session is the new owner's to use if the metadata
        names it; if not, the new owner opened its own and ours would play
        to nobody, so it is stopped.
        """
        self.log.warn("stream {key}: lost ownership; following", key=self.key)
        self.role = Role.FOLLOWER
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        self.state, self.health = StreamState.STARTED, Health.HEALTHY
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        self._drop_unstored()
        self._next_index = self._last_index + 1
        self._start_polling()
        engine, playback = self.engine, self.playback
        self.playback = None
        if playback is None:
            return
        meta = await self.store.get_stream(self.key) or {}
        if meta.get(Meta.PLAYBACK_SESSION_ID) != playback.playback_session_id:
            await self._stop_engine(engine, playback)

    def _start_polling(self) -> None:
        if self._poll_loop is None or not self._poll_loop.running:
            self._poll_loop = self._loop(self._fetch, FOLLOW_POLL)

    def _drop_unstored(self) -> None:
        """
        Forget the chunks waiting for the store, except one being appended.
        """
        head = self._unstored[0] if self._appending else None
        self._unstored.clear()
        if head is not None:
            self._unstored.append(head)

    async def _promote(self) -> None:
        """
        The owner's lease lapsed and is ours now: read what it left in the
        buffer, then open the engine (reusing its session when it still
        plays) and write the buffer on from there.
        """
        self.log.warn("stream {key}: the owner is gone; taking the stream over", key=self.key)
        try:
            await self._fetch()
            self.role = Role.OWNER
            if self._poll_loop is not None and self._poll_loop.running:
                self._poll_loop.stop()
            self._poll_loop = None
            self.reconnects += 1
            meta = await self.store.get_stream(self.key)
            await self._open_engine(meta)
            await self._wait_first_data()
        except CancelledError:
            self._starting = None
            if self.role is Role.FOLLOWER:
                # Stopped before it owned anything: stopping a follower
                # leaves the lease alone, so give it back here.
                self.store.release_owner(self.key).addErrback(self._ignore_unavailable)
            return
        except Exception as e:
            self._starting = None
            self.log.warn("stream {key}: takeover failed: {why}", key=self.key, why=e)
            self.stop("takeover failed")
            return
        await self._now_owning("taken over", Event.OWNER_CHANGED)

    # Players

    def add_player(self, client: PlayerInfo, request) -> PlayerProducer:
        """
        Attach a player and start streaming to it.
        """
        producer = PlayerProducer(
            client,
            self.follower,
            request,
            self._player_left,
            clock=self.clock,
            write_timeout=self.tuning.write_timeout,
        )
        self.players.add(producer)
        if self._cancel_cleanup():
            self.store.set_last_disconnect(self.key, None).addErrback(self._ignore_unavailable)
        self.store.add_player(self.key, client.id, self.player_fields(producer)).addErrback(
            self._ignore_unavailable
        )
        self._publish(Event.PLAYER_CONNECTED, client_id=client.id)
        self.log.info(
            "client {client} ({address}) joined stream {key}",
            client=client.id,
            address=client.address,
            key=self.key,
        )
        producer.start()
        return producer

    def player_fields(self, producer: PlayerProducer) -> dict:
        client = producer.info
        return {
            PlayerField.ID: client.id,
            PlayerField.WORKER: self.worker_id,
            PlayerField.ADDRESS: client.address,
            PlayerField.USER_AGENT: client.user_agent,
            PlayerField.CONNECTED_AT: client.connected_at,
            PlayerField.LAST_HEARTBEAT: self.clock.seconds(),
            PlayerField.BYTES_SENT: producer.bytes_sent,
            PlayerField.SKIPS: producer.skips,
        }

    def player(self, client_id: str) -> PlayerProducer | None:
        for producer in self.players:
            if producer.info.id == client_id:
                return producer
        return None

    def _player_left(self, producer: PlayerProducer) -> None:
        self.players.discard(producer)
        self.log.info(
            "client {client} left stream {key} after {bytes} bytes",
            client=producer.info.id,
            key=self.key,
            bytes=producer.bytes_sent,
        )
        d = self.store.remove_player(self.key, producer.info.id)
        d.addCallback(self._client_removed, producer.info.id)
        d.addErrback(self._ignore_unavailable)

    def _client_removed(self, remaining: int, client_id: str) -> None:
        if self.stopping:
            return
        self._publish(Event.PLAYER_DISCONNECTED, client_id=client_id, remaining=remaining)
        if remaining == 0 or (self.role is Role.FOLLOWER and not self.players):
            self._player_gone(remaining == 0)

    def _player_gone(self, nobody_left: bool = True) -> None:
        """
        No player here (and, for an owner, none anywhere): after the grace,
        unless one comes back, an owner stops the stream and a follower
        stops following.
        """
        if not self.live:
            return
        if nobody_left:
            self.store.set_last_disconnect(self.key, self.clock.seconds()).addErrback(
                self._ignore_unavailable
            )
        if self._cleanup_call is None:
            self._cleanup_call = self.clock.callLater(self.tuning.cleanup_grace, self._grace_over)

    def _cancel_cleanup(self) -> bool:
        if self._cleanup_call is None:
            return False
        self._cleanup_call.cancel()
        self._cleanup_call = None
        return True

    def _grace_over(self) -> None:
        self._cleanup_call = None
        if self.role is Role.FOLLOWER:
            if not self.players and self.live:
                self.stop("no players here")
            return
        Deferred.fromCoroutine(self.check_idle())

    async def refresh(self) -> None:
        """
        The supervisor's periodic work for a stream this worker owns: bring
        its metadata (bytes in, time of last data) up to date, and stop it if
        it has been idle for the grace.  The lease is confirmed first: after
        a Redis restart, metadata written back without it would look to the
        followers like a stream whose owner died.
        """
        if self.role is not Role.OWNER or not self.live:
            return
        if not self.store.available or not await self._keep_lease():
            return
        await self._put_metadata()
        await self.check_idle()

    async def check_idle(self) -> None:
        """
        Owner: stop the stream if no worker has had a player for the grace.
        """
        if self.role is not Role.OWNER or not self.live:
            return
        if self.players:
            return
        try:
            clients = await self.store.list_players(self.key)
            left_at = await self.store.get_last_disconnect(self.key)
        except Unavailable:
            return
        if clients:
            return
        now = self.clock.seconds()
        if left_at is None:
            await self.store.set_last_disconnect(self.key, now)
        elif now - left_at >= self.tuning.cleanup_grace - 1e-6:
            self.stop("no players")
        elif self._cleanup_call is None:
            wait = self.tuning.cleanup_grace - (now - left_at)
            self._cleanup_call = self.clock.callLater(wait, self._grace_over)

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
            self._stopped = Deferred()
            self.on_stopping(self, self._stopped)
            Deferred.fromCoroutine(self._stop(why, handover)).chainDeferred(self._stopped)
        return self._stopped

    async def _stop(self, why: str, handover: bool) -> None:
        self.state = StreamState.STOPPING
        self.log.info("stream {key} stopping: {why}", key=self.key, why=why)
        self._cancel_cleanup()
        for loop in (self._lease_loop, self._poll_loop, self._health_loop):
            if loop is not None and loop.running:
                loop.stop()
        for pending in (self._starting, self._reconnecting):
            if pending is not None:
                pending.cancel()
        if not self._ready:
            self._set_ready(Failure(EngineError(f"stream {self.key} stopped: {why}")))
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        self._drop_unstored()
        for producer in list(self.players):
            producer.finish()
        self.follower.window.clear()
        self.store.unlisten(self.key, self._event)
        if self.role is Role.OWNER:
            if handover:
                await self._hand_over()
            else:
                await self._end_stream()
        self.log.info("stream {key} stopped", key=self.key)

    async def _hand_over(self) -> None:
        if not self.store.available:
            self.log.warn("stream {key}: could not hand over, Redis is down", key=self.key)
            return
        try:
            await self.store.release_owner(self.key)
            await self._publish_now(Event.OWNER_CHANGED, handover=True)
        except Unavailable:
            self.log.warn("stream {key}: could not hand over, Redis is down", key=self.key)

    async def _end_stream(self) -> None:
        """
        Tell the other workers, delete the keys, stop the engine session.
        With Redis down the keys are left to expire rather than have the
        engine wait for the store's timeout.
        """
        try:
            if not self.store.available:
                raise Unavailable("the store is down")
            await self._publish_now(Event.STREAM_STOPPING)
            await self.store.delete_stream(self.key)
        except Unavailable:
            self.log.warn("stream {key}: could not delete its keys, Redis is down", key=self.key)
        except Exception:
            self.log.failure("stream {key}: could not delete its keys", key=self.key)
        if self.playback is not None:
            await self._stop_engine(self.engine, self.playback)

    async def _stop_engine(self, engine: Engine, playback: Playback) -> None:
        try:
            await self.api.stop(engine, playback)
        except ProxyError as e:
            self.log.warn(
                "stream {key}: engine {engine} did not confirm stop: {why}",
                key=self.key,
                engine=engine.id,
                why=e.message,
            )

    # Store helpers

    async def _put_metadata(self) -> None:
        try:
            await self.store.put_stream(self.key, self.metadata())
        except Unavailable:
            if self.role is Role.OWNER and self._starting is not None:
                raise

    def _write_metadata(self) -> None:
        """
        Put the metadata without waiting; a store that is down is no reason
        to hold anything up.
        """
        self.store.put_stream(self.key, self.metadata()).addErrback(self._ignore_unavailable)

    def _publish(self, event: Event, **fields) -> None:
        self._publish_now(event, **fields).addErrback(self._ignore_unavailable)

    def _publish_now(self, event: Event, **fields) -> Deferred:
        return self.store.publish(self.key, event.value, **fields)

    def _ignore_unavailable(self, failure: Failure) -> None:
        if not failure.check(Unavailable):
            self.log.failure("stream {key}: store call failed", failure, key=self.key)

    # Inspection

    def metadata(self) -> dict:
        """
        The stream's metadata as the store keeps it.
        """
        fields = {
            Meta.KEY: self.key,
            Meta.STATE: self.state.value,
            Meta.PARAM: self.param,
            Meta.OWNER: self.worker_id,
            Meta.STARTED_AT: self.started_at,
            Meta.BYTES_IN: self.bytes_in,
            Meta.RECONNECTS: self.reconnects,
            Meta.HEALTH: self.health.value,
        }
        if self.engine is not None:
            fields[Meta.ENGINE_ID] = self.engine.id
            fields[Meta.ENGINE_URL] = self.engine.url
        if self.last_data_at is not None:
            fields[Meta.LAST_DATA_AT] = self.last_data_at
        if self.playback is not None:
            fields.update(
                {
                    Meta.PLAYBACK_URL: self.playback.playback_url,
                    Meta.STAT_URL: self.playback.stat_url,
                    Meta.COMMAND_URL: self.playback.command_url,
                    Meta.PLAYBACK_SESSION_ID: self.playback.playback_session_id,
                    Meta.IS_LIVE: self.playback.is_live,
                }
            )
        return {str(k): v for k, v in fields.items()}
