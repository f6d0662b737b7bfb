"""
Stream ownership between workers, on a L{Clock}: two or three workers in one
process share one in-memory store, so that the owner lease, a takeover, a
hand-over, a demotion and a store that lost its keys play out to the
second, with no wall-clock polling.

Each worker has its own view of the embedded store (its own worker id) over
one shared state, with the one thing Redis has that the embedded store
lacks: the owner lease expires (C{PX}) once its holder stops renewing it.
The engine is one fake behind every worker's API, so that a session one
worker opened can be played by another, and every call to it is recorded
with the worker that made it.  It plays one live broadcast whose packets
are numbered by time, so a player's bytes show a gap wherever nobody was
reading the engine.
"""

import functools

import attrs
import pytest
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from acestream_proxy.config import Tuning
from acestream_proxy.constants import Meta, PlayerField, Role
from acestream_proxy.engine.api import Playback
from acestream_proxy.engine.registry import Engine, EngineRegistry
from acestream_proxy.errors import EngineError, Unavailable
from acestream_proxy.store.base import Listeners
from acestream_proxy.store.memory import MemorySegmentIndex, MemoryStore
from acestream_proxy.stream.lease import OwnerLease, Renewal
from acestream_proxy.stream.registry import StreamRegistry
from acestream_proxy.stream.stream import Stream
from acestream_proxy.stream.tail import BufferTail
from acestream_proxy.testing.synthetic import verify

from .fakes import FakeRequest, packets
from .test_reconnect import body

KEY = "ef" * 20

#: The default lease, spelt out: the timings below are fractions of it.
LEASE = 15.0

ENGINE_URL = "http://127.0.0.1:6878"

#: Packets the engine sends per step of L{Cluster.run}: one chunk.
PACKETS_PER_STEP = 10


# --- one store, a view per worker --------------------------------------------------


@attrs.define(eq=False)
class SharedState:
    """
    What Redis would hold for every worker: lease holders (and when each
    lease lapses), stream metadata, players, last-disconnect times, ring
    buffers, and the subscribers of each stream's channel.
    """

    owners: dict = attrs.field(factory=dict)
    lease_until: dict = attrs.field(factory=dict)
    streams: dict = attrs.field(factory=dict)
    clients: dict = attrs.field(factory=dict)
    last_disconnect: dict = attrs.field(factory=dict)
    buffers: dict = attrs.field(factory=dict)
    listeners: Listeners = attrs.field(factory=Listeners)
    segments: MemorySegmentIndex = attrs.field(factory=MemorySegmentIndex)

    def wipe(self) -> None:
        """
        Lose every key, as a Redis restarted empty does.  Subscriptions
        stay: the stores subscribe again when they reconnect.
        """
        for keys in (
            self.owners,
            self.lease_until,
            self.streams,
            self.clients,
            self.last_disconnect,
            self.buffers,
        ):
            keys.clear()

    def chunks(self, key: str = KEY) -> list[tuple[int, bytes]]:
        """
        The stream's ring buffer, oldest chunk first.
        """
        stream = self.buffers.get(key)
        return [(index, bytes(data)) for index, _, data in stream.chunks] if stream else []


def _needs_store(method):
    """
    A store call that fails as the Redis store's does while this worker
    cannot reach it.
    """

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not self.available:
            return fail(Unavailable("the store is down"))
        return method(self, *args, **kwargs)

    return call


@attrs.define
class SharedMemoryStore(MemoryStore):
    """
    One worker's view of a L{SharedState}: the embedded store, pointed at
    state every view shares, its owner lease lapsing C{lease} seconds after
    it was last taken or renewed.  C{available} false is this worker's
    connection to Redis down: every call fails with L{Unavailable}.
    """

    shared: SharedState = attrs.field(kw_only=True)
    lease: float = attrs.field(kw_only=True)
    available: bool = attrs.field(default=True, kw_only=True)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        shared = self.shared
        self._owners = shared.owners
        self._streams = shared.streams
        self._clients = shared.clients
        self._last_disconnect = shared.last_disconnect
        self._listeners = shared.listeners
        self.buffer._streams = shared.buffers
        self.buffer.may_append = self._holds_lease
        self.segments = shared.segments

    def _lapse(self, key: str) -> None:
        until = self.shared.lease_until.get(key)
        if until is not None and self.clock.seconds() >= until:
            del self.shared.lease_until[key]
            self.shared.owners.pop(key, None)

    def _holds_lease(self, key: str) -> bool:
        self._lapse(key)
        return self.shared.owners.get(key) == self.worker_id

    @_needs_store
    def acquire_owner(self, key: str) -> Deferred[bool]:
        self._lapse(key)
        if key in self.shared.owners:
            return succeed(False)
        self.shared.owners[key] = self.worker_id
        self.shared.lease_until[key] = self.clock.seconds() + self.lease
        return succeed(True)

    @_needs_store
    def renew_owner(self, key: str) -> Deferred[bool]:
        if not self._holds_lease(key):
            return succeed(False)
        self.shared.lease_until[key] = self.clock.seconds() + self.lease
        return succeed(True)

    @_needs_store
    def release_owner(self, key: str) -> Deferred[bool]:
        if not self._holds_lease(key):
            return succeed(False)
        del self.shared.owners[key], self.shared.lease_until[key]
        return succeed(True)

    @_needs_store
    def get_owner(self, key: str) -> Deferred[str | None]:
        self._lapse(key)
        return succeed(self.shared.owners.get(key))

    @_needs_store
    def delete_stream(self, key: str) -> Deferred[None]:
        if self._holds_lease(key):
            del self.shared.lease_until[key]
        return MemoryStore.delete_stream(self, key)

    put_stream = _needs_store(MemoryStore.put_stream)
    get_stream = _needs_store(MemoryStore.get_stream)
    list_streams = _needs_store(MemoryStore.list_streams)
    add_player = _needs_store(MemoryStore.add_player)
    update_player = _needs_store(MemoryStore.update_player)
    remove_player = _needs_store(MemoryStore.remove_player)
    count_players = _needs_store(MemoryStore.count_players)
    list_players = _needs_store(MemoryStore.list_players)
    set_last_disconnect = _needs_store(MemoryStore.set_last_disconnect)
    get_last_disconnect = _needs_store(MemoryStore.get_last_disconnect)
    publish = _needs_store(MemoryStore.publish)


def shared_stores(clock, tuning: Tuning, *workers: str) -> list[SharedMemoryStore]:
    """
    A view of one new shared state for each worker id.
    """
    shared = SharedState()
    return [
        SharedMemoryStore(
            clock,
            tuning.buffer_chunks,
            tuning.chunk_ttl,
            worker,
            shared=shared,
            lease=tuning.owner_lease,
        )
        for worker in workers
    ]


# --- one engine behind every worker ------------------------------------------------


@attrs.define(eq=False)
class SharedEngine:
    """
    The engine every worker's API talks to.

    @ivar sessions: C{(worker, session id)} of each C{getstream}.
    @ivar playbacks: C{(worker, session id, body protocol)} of each
        playback connection.
    @ivar stops: C{(worker, session id)} of each stop command.
    @ivar ended: the sessions that no longer play (stopped, or dropped by
        the engine).
    @ivar exclusive: a session plays to one connection at a time: opening
        a second one while the first still reads fails.
    @ivar held: workers whose connections get nothing (their process
        stands still).
    """

    sessions: list = attrs.field(factory=list)
    playbacks: list = attrs.field(factory=list)
    stops: list = attrs.field(factory=list)
    ended: set = attrs.field(factory=set)
    exclusive: bool = False
    held: set = attrs.field(factory=set)
    seq: int = 0

    def reading(self, sid: str | None = None) -> list[tuple[str, str]]:
        """
        C{(worker, session id)} of the playback connections still open.
        """
        return [
            (worker, session)
            for worker, session, reader in self.playbacks
            if not reader.stopped and sid in (None, session)
        ]

    def send(self, count: int = PACKETS_PER_STEP) -> None:
        """
        The broadcast moves on by C{count} packets, which every open
        playback connection that is not paused or held receives.
        """
        data = packets(self.seq, count)
        self.seq += count
        for worker, _, reader in list(self.playbacks):
            if not (reader.stopped or reader.paused or worker in self.held):
                reader.dataReceived(data)

    def stop(self, worker: str, sid: str) -> None:
        """
        A stop command: the session ends, and so do its playback bodies.
        """
        self.stops.append((worker, sid))
        self.ended.add(sid)
        for _, session, reader in list(self.playbacks):
            if session == sid and not reader.stopped:
                reader.connectionLost(Failure(ResponseDone()))


@attrs.define(eq=False)
class WorkerAPI:
    """
    One worker's engine API, on the shared engine.
    """

    engine: SharedEngine
    worker: str

    async def getstream(self, engine, key, param="infohash"):
        sid = f"session-{len(self.engine.sessions) + 1}"
        self.engine.sessions.append((self.worker, sid))
        base = f"{engine.url}/ace"
        return Playback(
            f"{base}/r/{key}/{sid}", f"{base}/stat/{key}/{sid}", f"{base}/cmd/{key}/{sid}", sid, 1
        )

    async def open_playback(self, engine, playback):
        sid = playback.playback_session_id
        if sid in self.engine.ended:
            raise EngineError(f"engine {engine.id}: session {sid} no longer plays")
        if self.engine.exclusive and self.engine.reading(sid):
            raise EngineError(f"engine {engine.id}: session {sid} plays to another connection")
        return _Body(self.engine, self.worker, sid)

    async def stop(self, engine, playback):
        self.engine.stop(self.worker, playback.playback_session_id)

    async def version(self, engine):
        return "3.1.5"


@attrs.define(eq=False)
class _Body:
    engine: SharedEngine
    worker: str
    sid: str

    def deliverBody(self, protocol) -> None:
        protocol.makeConnection(StringTransport())
        self.engine.playbacks.append((self.worker, self.sid, protocol))


# --- workers -------------------------------------------------------------------------


class _ClosingTransport(StringTransport):
    """
    A player's connection as a TCP transport behaves at shutdown: it may be
    told to forget a producer it does not have, and it closes as soon as it
    is asked to (its bytes are all out), so a shutdown waits out no drain.
    """

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseConnection(self) -> None:
        super().loseConnection()
        self.connected = False


@attrs.define(eq=False)
class Player:
    request: FakeRequest
    attached: Deferred

    @property
    def data(self) -> bytes:
        return body(self.request)

    def report(self, allowed_jumps: int = 0):
        return verify(self.data, allowed_jumps=allowed_jumps)

    @property
    def ended(self) -> bool:
        """
        The stream ended its response cleanly: C{attach} fired with the
        player's C{done}, and that fired with L{None}.
        """
        done = self.attached.result if self.attached.called else None
        return isinstance(done, Deferred) and done.called and done.result is None


@attrs.define(eq=False)
class Worker:
    name: str
    store: SharedMemoryStore
    api: WorkerAPI
    registry: StreamRegistry
    players: list = attrs.field(factory=list)
    dead: bool = False

    @property
    def stream(self) -> Stream | None:
        return self.registry.streams.get(KEY)

    @property
    def role(self) -> Role | None:
        return self.stream.role if self.stream is not None else None

    def play(self) -> Player:
        """
        A new player of KEY here.
        """
        request = FakeRequest(transport=_ClosingTransport())
        player = Player(request, Deferred.fromCoroutine(self.registry.attach(KEY, "id", request)))
        self.players.append(player)
        return player

    def player_ids(self) -> set[str]:
        return {producer.info.id for producer in self.stream.players} if self.stream else set()


@attrs.define(eq=False)
class Cluster:
    """
    Workers on one clock, one store and one engine.
    """

    clock: Clock
    shared: SharedState
    engine: SharedEngine
    workers: list[Worker]

    def run(self, seconds: float, step: float = 0.5, until=None) -> float:
        """
        Let C{seconds} pass, the engine sending one chunk's packets each
        C{step}; stop early once C{until()} holds.  Return the time it
        held first (or the time at the end).
        """
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(step)
            self.engine.send()
            if until is not None and until():
                break
        return self.clock.seconds()

    def meta(self) -> dict:
        return self.shared.streams.get(KEY) or {}

    def owner(self) -> str | None:
        return self.shared.owners.get(KEY)

    def buffered(self) -> bytes:
        return b"".join(data for _, data in self.shared.chunks())

    def shut_down(self, *workers: Worker) -> None:
        """
        Shut down C{workers} (else every worker still running, the last
        one first), each shutdown complete before the next.
        """
        for worker in workers or self.workers[::-1]:
            if worker.registry.running and not worker.dead:
                stopped = worker.registry.stopService()
                self.clock.advance(0)
                assert stopped.called, worker.name
                assert not isinstance(stopped.result, Failure), stopped.result


def cluster(*names: str, **tuning) -> Cluster:
    """
    Running workers named C{names} (the first starts at time 0) sharing one
    store and one engine, with the default tuning but for C{tuning}; each
    engine read is a chunk of its own (C{chunk_bytes=0}).
    """
    clock = Clock()
    tuning = Tuning(**{"owner_lease": LEASE, "chunk_bytes": 0} | tuning)
    engine = SharedEngine()
    stores = shared_stores(clock, tuning, *names)
    workers = []
    for name, store in zip(names, stores):
        api = WorkerAPI(engine, name)
        engines = EngineRegistry([Engine("engine-a", ENGINE_URL, "127.0.0.1", 6878)], api)
        registry = StreamRegistry(store, engines, api, clock, tuning, name)
        registry.startService()
        workers.append(Worker(name, store, api, registry))
    return Cluster(clock, stores[0].shared, engine, workers)


def owner_and_followers(*names: str, **tuning) -> Cluster:
    """
    A player on each worker, joining one second apart: the first worker
    owns the stream on session-1 and the others follow it; each has had a
    second of broadcast.
    """
    c = cluster(*names, **tuning)
    for worker in c.workers:
        player = worker.play()
        if worker is c.workers[0]:
            c.engine.send()
        assert player.attached.called and worker.stream.live, worker.name
        c.run(1)
    assert [w.role for w in c.workers] == [Role.OWNER] + [Role.FOLLOWER] * (len(names) - 1)
    assert c.engine.sessions == [(names[0], "session-1")]
    return c


def timers(service) -> list[TimerService]:
    """
    The timers in C{service}'s tree, in its order.
    """
    found = []
    for child in service:
        if isinstance(child, TimerService):
            found.append(child)
        elif isinstance(child, MultiService):
            found.extend(timers(child))
    return found


def kill(worker: Worker) -> None:
    """
    The worker's process dies: its timers and its reads stop where they
    are.  It releases no lease, tells nobody, unregisters no player, and
    its connection to the store is gone.
    """
    registry = worker.registry
    for service in list(registry):
        if isinstance(service, Stream):
            service.tasks.cancel_all()
            MultiService.stopService(service)
            worker.store.unlisten(service.key, service._event)
        else:
            service.stopService()
    registry.tasks.cancel_all()
    worker.store.available = False
    worker.dead = True


def freeze(worker: Worker) -> list[TimerService]:
    """
    The worker's process stands still (SIGSTOP, a long GC pause): none of
    its timers fire and its engine connections deliver nothing.  Return
    the timers that were running, for L{thaw}.
    """
    frozen = [timer for timer in timers(worker.registry) if timer.running]
    for timer in frozen:
        timer.stopService()
    worker.api.engine.held.add(worker.name)
    return frozen


def thaw(worker: Worker, frozen: list[TimerService]) -> None:
    """
    The process runs again: each overdue timer fires at once, in the
    order of the service tree, but for those of services that stopped
    meanwhile.
    """
    worker.api.engine.held.discard(worker.name)
    for timer in frozen:
        if timer.parent is not None and timer.parent.running:
            timer.startService()


# --- one owner, one follower ----------------------------------------------------------


def test_follower_plays_the_owners_chunks():
    """
    One engine session for two workers: the follower's player gets exactly
    the bytes the owner's player got, whole packets in order, read from the
    owner's buffer.  Stopping the follower then the owner ends the stream:
    the engine is told to stop once, by the owner, and nothing is left.
    """
    c = owner_and_followers("worker-a", "worker-b")
    owner, follower = c.workers
    c.run(10)
    assert c.engine.sessions == [("worker-a", "session-1")]
    assert c.engine.reading() == [("worker-a", "session-1")]
    assert c.owner() == "worker-a"
    assert c.meta()[Meta.OWNER] == "worker-a"

    (owned,), (followed,) = owner.players, follower.players
    report = followed.report()
    assert report.ok, report.describe()
    assert followed.data == owned.data == c.buffered()
    assert report.last_seq == c.engine.seq - 1
    sent = c.engine.seq // PACKETS_PER_STEP
    assert [index for index, _ in c.shared.chunks()] == list(range(1, sent + 1))
    assert follower.stream.fanout.last_index == owner.stream.fanout.last_index == sent
    players = c.shared.clients[KEY]
    assert {fields[PlayerField.WORKER] for fields in players.values()} == {"worker-a", "worker-b"}

    c.shut_down()
    assert owned.ended and followed.ended
    assert c.engine.stops == [("worker-a", "session-1")]
    assert c.engine.reading() == []
    assert (c.shared.owners, c.shared.streams, c.shared.clients, c.shared.buffers) == ({},) * 4
    assert c.clock.getDelayedCalls() == []


# --- the owner dies ----------------------------------------------------------------------


@pytest.mark.parametrize("still_plays", [True, False], ids=["session-reused", "new-session"])
def test_follower_takes_over_when_the_owner_dies(still_plays):
    """
    The owner's process dies without a word: once its lease lapses (and
    within a lease and a third of its death) the follower takes the
    stream over.  It reuses the engine session when that still plays, or
    opens a new one; it counts the takeover as a reconnection; the buffer
    index carries on; its player keeps its connection and sees one gap,
    the time nobody read the engine.  The dead worker's player is removed
    as a ghost, and the survivor ends the stream when it shuts down.
    """
    c = owner_and_followers("worker-a", "worker-b")
    dead, survivor = c.workers
    c.run(5.5)
    lapses_at = c.shared.lease_until[KEY]
    last = survivor.stream.fanout.last_index
    died_at = c.clock.seconds()
    kill(dead)
    if not still_plays:
        c.engine.ended.add("session-1")

    took_at = c.run(2 * LEASE, step=0.25, until=lambda: survivor.role is Role.OWNER)
    assert lapses_at <= took_at <= died_at + LEASE + LEASE / 3
    assert c.owner() == "worker-b"
    assert survivor.stream.lease.until == took_at + LEASE
    c.run(5)
    session = "session-1" if still_plays else "session-2"
    assert c.engine.sessions == [("worker-a", "session-1")] + (
        [] if still_plays else [("worker-b", "session-2")]
    )
    assert c.engine.reading() == [("worker-b", session)]
    assert c.engine.stops == []
    meta = c.meta()
    assert (meta[Meta.OWNER], meta[Meta.PLAYBACK_SESSION_ID]) == ("worker-b", session)
    assert meta[Meta.RECONNECTS] == 1

    indices = [index for index, _ in c.shared.chunks()]
    assert indices == list(range(1, len(indices) + 1)) and indices[-1] > last
    (player,) = survivor.players
    report = player.report(allowed_jumps=1)
    assert report.ok and len(report.gaps) == 1, report.describe()
    assert report.last_seq == c.engine.seq - 1
    assert not player.ended
    assert verify(c.buffered(), allowed_jumps=1).ok

    # Its last heartbeat was at its join, at 0: gone after the ghost timeout.
    ghost_timeout = survivor.registry.tuning.ghost_client_timeout
    c.run(ghost_timeout + 10 - c.clock.seconds())
    assert set(c.shared.clients[KEY]) == survivor.player_ids()

    c.shut_down()
    assert player.ended
    assert c.engine.stops == [("worker-b", session)]
    assert (c.shared.owners, c.shared.streams, c.shared.clients, c.shared.buffers) == ({},) * 4
    assert c.clock.getDelayedCalls() == []


def test_one_of_two_followers_takes_over():
    """
    Two followers of a dead owner: the first to ask takes the lease, the
    other goes on following, now the new owner's buffer; one engine
    session throughout.
    """
    c = owner_and_followers("worker-a", "worker-b", "worker-c")
    dead, first, second = c.workers
    c.run(2)
    kill(dead)
    c.run(2 * LEASE, step=0.25, until=lambda: first.role is Role.OWNER)
    c.run(LEASE)
    assert (first.role, second.role, c.owner()) == (Role.OWNER, Role.FOLLOWER, "worker-b")
    assert c.engine.sessions == [("worker-a", "session-1")]
    assert c.engine.reading() == [("worker-b", "session-1")]
    for worker in (first, second):
        (player,) = worker.players
        report = player.report(allowed_jumps=1)
        assert report.ok and len(report.gaps) == 1, (worker.name, report.describe())
        assert report.last_seq == c.engine.seq - 1

    # Once the dead worker's player is removed as a ghost, no other
    # worker has players: the last one ends the stream.
    c.run(first.registry.tuning.ghost_client_timeout + 10 - c.clock.seconds())
    assert set(c.shared.clients[KEY]) == first.player_ids() | second.player_ids()
    c.shut_down(second, first)
    assert c.engine.stops == [("worker-b", "session-1")]
    assert c.clock.getDelayedCalls() == []


@pytest.mark.parametrize("still_plays", [True, False], ids=["session-reused", "new-session"])
def test_a_takeover_counts_on_from_the_owners_reconnections(still_plays):
    """
    The owner had reconnected once (the engine ended its playback) before
    it died: its successor's count goes on from there, the takeover
    counted, whether it reuses the owner's session or opens its own.
    """
    c = owner_and_followers("worker-a", "worker-b")
    dead, survivor = c.workers
    ((_, _, reader),) = c.engine.playbacks
    reader.connectionLost(Failure(ResponseDone()))
    c.run(2)
    assert c.engine.reading() == [("worker-a", "session-2")]
    assert c.meta()[Meta.RECONNECTS] == 1
    kill(dead)
    if not still_plays:
        c.engine.ended.add("session-2")
    c.run(2 * LEASE, step=0.25, until=lambda: survivor.role is Role.OWNER)
    c.run(1)
    meta = c.meta()
    assert c.engine.reading() == [("worker-b", meta[Meta.PLAYBACK_SESSION_ID])]
    assert meta[Meta.PLAYBACK_SESSION_ID] == ("session-2" if still_plays else "session-3")
    assert (meta[Meta.OWNER], meta[Meta.RECONNECTS]) == ("worker-b", 2)

    c.run(survivor.registry.tuning.ghost_client_timeout + 10 - c.clock.seconds())
    c.shut_down()
    assert c.engine.stops[-1] == ("worker-b", meta[Meta.PLAYBACK_SESSION_ID])
    assert c.clock.getDelayedCalls() == []


# --- hand-over -----------------------------------------------------------------------------


def test_owner_shutting_down_hands_the_stream_over_at_once():
    """
    An owner that shuts down while another worker has players hands the
    stream over: its players get a clean end, it gives the lease up and
    says so, and the follower takes over at once (no lease to wait out) on
    the same engine session, which nobody told to stop.
    """
    c = owner_and_followers("worker-a", "worker-b")
    leaving, staying = c.workers
    c.run(5)
    handed_at = c.clock.seconds()
    stopped = leaving.registry.stopService()
    assert stopped.called
    assert leaving.players[0].ended
    assert c.owner() is None and staying.role is Role.FOLLOWER
    assert c.engine.reading() == []

    c.clock.advance(0)
    assert staying.role is Role.OWNER and c.owner() == "worker-b"
    assert staying.stream.lease.until == handed_at + LEASE
    assert c.engine.reading() == [("worker-b", "session-1")]
    c.run(5)
    assert c.engine.sessions == [("worker-a", "session-1")]
    assert c.engine.stops == []
    meta = c.meta()
    assert (meta[Meta.OWNER], meta[Meta.PLAYBACK_SESSION_ID]) == ("worker-b", "session-1")
    assert meta[Meta.RECONNECTS] == 1
    (player,) = staying.players
    report = player.report()
    assert report.ok and report.last_seq == c.engine.seq - 1, report.describe()

    c.shut_down()
    assert c.engine.stops == [("worker-b", "session-1")]
    assert c.clock.getDelayedCalls() == []


def test_workers_shutting_down_together_leave_no_timer():
    """
    The owner and its follower shut down in the same turn (a rolling
    restart that is not rolling): the owner, seeing the follower's
    player, hands the stream over, and the follower, stopping, does not
    take it.  The hand-over it was told of is no timer of its own that
    outlives it.
    """
    c = owner_and_followers("worker-a", "worker-b")
    c.run(5)
    stopped = [worker.registry.stopService() for worker in c.workers]
    assert all(d.called for d in stopped)
    assert [player.ended for worker in c.workers for player in worker.players] == [True, True]
    assert c.owner() is None and c.engine.reading() == []
    assert c.clock.getDelayedCalls() == []


# --- demotion --------------------------------------------------------------------------------


@pytest.mark.parametrize("exclusive", [False, True], ids=["same-session", "new-session"])
def test_owner_that_stood_still_steps_down(exclusive):
    """
    An owner stands still past its lease and the follower takes the
    stream over.  Running again, the old owner finds its lease held by
    another worker: it follows the buffer from the chunk after the last
    one its players got, and stops its engine session only if the new
    owner plays another one (the engine would not give the new owner a
    second connection to it).
    """
    c = owner_and_followers("worker-a", "worker-b")
    stalled, taker = c.workers
    c.engine.exclusive = exclusive
    c.run(4)
    frozen = freeze(stalled)
    lapses_at = c.shared.lease_until[KEY]
    last = stalled.stream.fanout.last_index
    took_at = c.run(2 * LEASE, step=0.25, until=lambda: taker.role is Role.OWNER)
    assert took_at >= lapses_at
    c.run(3)
    session = "session-2" if exclusive else "session-1"
    assert c.meta()[Meta.PLAYBACK_SESSION_ID] == session
    (player,) = stalled.players
    before = len(player.data)

    thaw(stalled, frozen)
    assert stalled.role is Role.FOLLOWER and isinstance(stalled.stream.source, BufferTail)
    assert c.owner() == "worker-b"
    newer = [data for index, data in c.shared.chunks() if index > last]
    assert player.data[before:] == b"".join(newer)
    assert c.engine.stops == ([("worker-a", "session-1")] if exclusive else [])
    assert c.engine.reading() == [("worker-b", session)]

    c.run(5)
    for worker in c.workers:
        (played,) = worker.players
        report = played.report(allowed_jumps=1)
        assert report.ok and len(report.gaps) == 1, (worker.name, report.describe())
        assert report.last_seq == c.engine.seq - 1
    assert verify(c.buffered(), allowed_jumps=1).ok
    assert c.engine.sessions == [("worker-a", "session-1")] + (
        [("worker-b", "session-2")] if exclusive else []
    )

    c.shut_down(stalled, taker)
    assert c.engine.stops[-1] == ("worker-b", session)
    assert c.clock.getDelayedCalls() == []


# --- the store lost its keys ------------------------------------------------------------------


def test_owner_restores_what_the_store_lost():
    """
    Redis restarts empty and the owner reaches it again later than the
    follower.  The follower sees a free lease and no metadata, which is what
    a restart looks like, and waits: the owner, back within a lease, takes
    its lease again and writes the metadata and its players back.  Its
    players never noticed; the follower's follow the buffer begun afresh.
    One engine session throughout.
    """
    c = owner_and_followers("worker-a", "worker-b")
    owner, follower = c.workers
    c.run(5.5)
    c.shared.wipe()
    owner.store.available = False

    c.run(2 * LEASE / 3)
    assert (c.owner(), c.meta(), follower.role) == (None, {}, Role.FOLLOWER)
    owner.store.available = True
    back_at = c.clock.seconds()
    restored_at = c.run(LEASE, step=0.25, until=lambda: c.owner() is not None)
    assert restored_at - back_at <= LEASE / 3
    assert c.owner() == "worker-a"
    meta = c.meta()
    assert (meta[Meta.OWNER], meta[Meta.PLAYBACK_SESSION_ID]) == ("worker-a", "session-1")
    assert owner.player_ids() <= set(c.shared.clients[KEY])

    c.run(2 * LEASE)
    assert (owner.role, follower.role, c.owner()) == (Role.OWNER, Role.FOLLOWER, "worker-a")
    assert c.engine.sessions == [("worker-a", "session-1")]
    assert c.engine.reading() == [("worker-a", "session-1")]
    assert set(c.shared.clients[KEY]) == owner.player_ids() | follower.player_ids()
    (owned,), (followed,) = owner.players, follower.players
    report = owned.report()
    assert report.ok and report.last_seq == c.engine.seq - 1, report.describe()
    report = followed.report(allowed_jumps=1)
    assert report.ok and len(report.gaps) == 1, report.describe()
    assert report.last_seq == c.engine.seq - 1

    c.shut_down()
    assert c.engine.stops == [("worker-a", "session-1")]
    assert c.clock.getDelayedCalls() == []


def test_follower_takes_over_a_lost_stream_after_a_whole_lease():
    """
    The owner is dead and Redis lost the stream's keys: with no metadata,
    the follower waits a whole lease from when it saw the stream orphaned
    (the owner, were it alive, would have written them back by then), then
    takes it over on a new engine session, there being none to reuse.
    """
    c = owner_and_followers("worker-a", "worker-b")
    dead, survivor = c.workers
    c.run(5.5)
    kill(dead)
    c.shared.wipe()
    wiped_at = c.clock.seconds()
    took_at = c.run(3 * LEASE, step=0.25, until=lambda: survivor.role is Role.OWNER)
    assert wiped_at + LEASE <= took_at <= wiped_at + LEASE + LEASE / 3
    c.run(5)
    assert c.engine.sessions == [("worker-a", "session-1"), ("worker-b", "session-2")]
    assert c.engine.reading() == [("worker-b", "session-2")]
    meta = c.meta()
    assert (meta[Meta.OWNER], meta[Meta.PLAYBACK_SESSION_ID]) == ("worker-b", "session-2")
    (player,) = survivor.players
    report = player.report(allowed_jumps=1)
    assert report.ok and len(report.gaps) == 1, report.describe()

    c.shut_down()
    assert c.engine.stops == [("worker-b", "session-2")]
    assert c.clock.getDelayedCalls() == []


# --- the lease alone --------------------------------------------------------------------------


def result(work):
    """
    The result of C{work} (a coroutine) on the embedded store, which
    answers at once.
    """
    d = Deferred.fromCoroutine(work)
    assert d.called
    return d.result


def lease_of(clock) -> tuple[OwnerLease, SharedMemoryStore, SharedMemoryStore]:
    """
    Worker A's lease of KEY, A's view of the store and worker B's.
    """
    mine, theirs = shared_stores(clock, Tuning(owner_lease=LEASE), "worker-a", "worker-b")
    return OwnerLease(KEY, mine, clock, LEASE), mine, theirs


def test_renewal_keeps_retakes_or_loses_the_lease():
    clock = Clock()
    lease, mine, theirs = lease_of(clock)
    clock.advance(1)
    assert mine.acquire_owner(KEY).result
    lease.taken(1)
    assert lease.until == 1 + LEASE

    clock.advance(LEASE / 3)
    assert result(lease.renew()) is Renewal.KEPT
    assert lease.until == 6 + LEASE

    # Redis lost the lease: it is free, and ours again.
    mine.shared.wipe()
    clock.advance(LEASE / 3)
    assert result(lease.renew()) is Renewal.RETAKEN
    assert (lease.until, theirs.get_owner(KEY).result) == (11 + LEASE, "worker-a")

    # We stood still past it, and another worker took it.
    clock.advance(LEASE)
    assert theirs.acquire_owner(KEY).result
    clock.advance(1)
    assert result(lease.renew()) is Renewal.LOST
    assert (lease.until, theirs.get_owner(KEY).result) == (11 + LEASE, "worker-b")


@pytest.mark.parametrize(
    "elapsed, safe",
    [(0, True), (2 * LEASE / 3, True), (2 * LEASE / 3 + 1e-6, False), (LEASE, False)],
)
def test_appending_is_safe_while_more_than_a_third_of_the_lease_is_left(elapsed, safe):
    clock = Clock()
    lease, _, _ = lease_of(clock)
    clock.advance(100)
    lease.taken(100)
    clock.advance(elapsed)
    assert lease.safe() is safe


def test_a_lease_held_by_another_worker_is_not_taken():
    clock = Clock()
    lease, mine, theirs = lease_of(clock)
    assert theirs.acquire_owner(KEY).result
    for _ in range(4):
        clock.advance(LEASE / 3)
        assert theirs.renew_owner(KEY).result
        assert result(lease.take_if_orphaned()) is False
    assert theirs.get_owner(KEY).result == "worker-b"


def test_a_stream_whose_owner_left_its_metadata_is_taken_at_once():
    """
    A free lease and the stream's metadata: its owner died or handed it
    over.
    """
    clock = Clock()
    lease, mine, theirs = lease_of(clock)
    theirs.put_stream(KEY, {Meta.OWNER: "worker-b"})
    clock.advance(3)
    assert result(lease.take_if_orphaned()) is True
    assert (mine.get_owner(KEY).result, lease.until) == ("worker-a", 3 + LEASE)


def test_a_stream_without_metadata_is_taken_after_a_whole_lease():
    """
    A free lease and no metadata is what a Redis restart looks like: the
    owner, if alive, writes both back within a third of a lease.  The
    lease is taken once the stream has been seen orphaned for a whole
    lease, counted again from scratch whenever an owner showed up.
    """
    clock = Clock()
    lease, mine, theirs = lease_of(clock)
    clock.advance(10)
    assert result(lease.take_if_orphaned()) is False
    clock.advance(LEASE - 0.25)
    assert result(lease.take_if_orphaned()) is False

    # An owner shows up, and goes away: the count starts again.
    assert theirs.acquire_owner(KEY).result
    assert result(lease.take_if_orphaned()) is False
    assert theirs.release_owner(KEY).result
    clock.advance(1)
    assert result(lease.take_if_orphaned()) is False
    clock.advance(LEASE - 0.25)
    assert result(lease.take_if_orphaned()) is False
    assert mine.get_owner(KEY).result is None

    clock.advance(0.25)
    assert result(lease.take_if_orphaned()) is True
    assert (mine.get_owner(KEY).result, lease.until) == ("worker-a", clock.seconds() + LEASE)


def test_the_shared_lease_lapses_unless_renewed():
    """
    The test store's own model of Redis's C{PX}: a lease nobody renews is
    free once it lapses, and the ring buffer then refuses its holder.
    """
    clock = Clock()
    mine, theirs = shared_stores(clock, Tuning(owner_lease=LEASE), "worker-a", "worker-b")
    assert mine.acquire_owner(KEY).result
    assert mine.buffer.append(KEY, b"x").result == 1
    clock.advance(LEASE - 1)
    assert mine.renew_owner(KEY).result
    clock.advance(LEASE - 0.25)
    assert (theirs.acquire_owner(KEY).result, theirs.get_owner(KEY).result) == (False, "worker-a")
    clock.advance(0.25)
    assert theirs.get_owner(KEY).result is None
    failed = mine.buffer.append(KEY, b"y")
    assert failed.result.check(Unavailable)
    failed.addErrback(lambda _: None)
    assert theirs.acquire_owner(KEY).result
    assert theirs.buffer.append(KEY, b"z").result == 2
