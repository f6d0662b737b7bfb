"""
The L{Store} contract, run against the embedded L{MemoryStore} and against
L{RedisStore} on a real redis-server: one suite, so that what the proxy sees
cannot differ with the store it is configured with.

A second worker is a second store object: for Redis, another L{RedisStore}
on the same server; for memory (one process, one worker in production), a
L{MemoryStore} that shares the first one's state under another worker id.
"""

import itertools
import json
import shutil

import attrs
import pytest
import pytest_twisted
import txredisapi
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import (
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
)
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from acestream_proxy.errors import Unavailable
from acestream_proxy.store import keys as keys
from acestream_proxy.store.base import NotOwner
from acestream_proxy.store.connection import unavailable as _unavailable
from acestream_proxy.store.memory import MemoryStore
from acestream_proxy.store.redis import RedisStore

from .redis_server import RedisServer, free_port
from .support import eventually

KEY = "ab" * 20
OTHER_KEY = "cd" * 20
WORKER = "worker-a"
PEER = "worker-b"

#: Store settings for most tests: long enough that nothing expires by itself.
SETTINGS = dict(buffer_chunks=5, chunk_ttl=30.0, ghost_client_timeout=30.0, owner_lease=30.0)

#: What a short expiry test waits for at most.
EXPIRY_WAIT = 5.0


@attrs.define
class Stores:
    """
    Makes started stores of one kind (C{url} L{None}: memory), and stops
    them after the test.  Memory stores made after the first share its
    state, standing for other workers of one store.
    """

    url: str | None
    started: list = attrs.field(factory=list)

    @property
    def redis(self) -> bool:
        return self.url is not None

    async def make(self, worker_id: str = WORKER, on=reactor, **overrides):
        """
        A started store of C{worker_id}; a Redis store runs C{on} the given
        reactor (the real one by default).
        """
        options = {**SETTINGS, **overrides}
        if self.redis:
            store = RedisStore(url=self.url, reactor=on, worker_id=worker_id, **options)
            store.startService()
            self.started.append(store)
            await eventually(lambda: store.available, what="the store connected")
            await subscribed(store)
            return store
        store = MemoryStore(reactor, options["buffer_chunks"], options["chunk_ttl"], worker_id)
        if self.started:
            _share_state(self.started[0], store)
        self.started.append(store)
        return store

    def stop(self) -> None:
        for store in self.started:
            if isinstance(store, RedisStore) and store.running:
                pytest_twisted.blockon(store.stopService())


def _share_state(first: MemoryStore, other: MemoryStore) -> None:
    """
    Make C{other} a second worker on C{first}'s state: what two workers
    sharing one Redis see, in one process.
    """
    for name in ("_owners", "_listeners", "_streams", "_clients", "_last_disconnect", "segments"):
        setattr(other, name, getattr(first, name))
    other.buffer._streams = first.buffer._streams


async def subscribed(store) -> None:
    """
    Wait until C{store} hears its own events: its subscription to the
    event channels is made on a connection of its own, after start.
    """
    heard = Heard()
    probe = "subscribed-" + store.worker_id
    store.listen(probe, heard)
    try:
        # A probe published before the subscription is made is lost: publish
        # again until one is heard.
        for _ in range(int(EXPIRY_WAIT / 0.05)):
            await store.publish(probe, "probe")
            try:
                await heard.wait("probe", timeout=0.05)
            except TimeoutError:
                continue
            return
        raise AssertionError("the store never heard its own events")
    finally:
        store.unlisten(probe, heard)


class Heard:
    """
    A listener that keeps every event it is given, and tells whoever waits
    for some as soon as they are there.
    """

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._waiting: list[tuple[str, int, Deferred]] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        waiting, self._waiting = self._waiting, []
        for name, count, d in waiting:
            self._check(name, count, d)

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]

    def wait(self, name: str, count: int = 1, timeout: float = EXPIRY_WAIT) -> Deferred:
        """
        Fire with the C{name} events heard, once there are at least
        C{count}; fail with L{TimeoutError} after C{timeout} seconds.
        """

        def forget(d: Deferred) -> None:
            if (name, count, d) in self._waiting:
                self._waiting.remove((name, count, d))

        d = Deferred(forget)
        self._check(name, count, d)
        return d.addTimeout(timeout, reactor)

    def _check(self, name: str, count: int, d: Deferred) -> None:
        named = self.named(name)
        if len(named) >= count:
            d.callback(named)
        else:
            self._waiting.append((name, count, d))


async def until(query, check, timeout: float = EXPIRY_WAIT, what: str = ""):
    """
    Ask the store C{query()} until C{check} accepts the answer: for what
    changes by itself (expiry), without guessing how long it takes.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = await query()
        if check(value):
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last answer {value!r}")
        await deferLater(reactor, 0.02, lambda: None)


def as_text(fields: dict) -> dict:
    """
    Field values as a Redis hash holds them: the embedded store keeps the
    numbers it is given, Redis gives text back, and callers accept both.
    """
    return {name: v if isinstance(v, str) else repr(v) for name, v in fields.items()}


@pytest.fixture
def stores(store_url):
    made = Stores(store_url)
    yield made
    made.stop()


@pytest.fixture
def store(stores):
    return pytest_twisted.blockon(Deferred.fromCoroutine(stores.make()))


@pytest.fixture
def redis_server_or_none(store_url, request):
    """
    The Redis server behind C{store_url}, for checks of its keys; L{None}
    with the embedded store.
    """
    return request.getfixturevalue("redis_server") if store_url else None


@pytest.fixture
def redis_stores(redis_server):
    """
    L{Stores} on Redis only, for what only several processes can show.
    """
    made = Stores(redis_server.url)
    yield made
    made.stop()


@pytest.fixture
def other_redis_server():
    """
    A second redis-server, for the first to replicate.
    """
    server = RedisServer().start()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@implementer(IReactorTCP, IReactorUNIX, IReactorTime, IReactorPluggableNameResolver)
class ReactorProxy:
    """
    A reactor to give a store in place of the real one: it connects through
    the real reactor and keeps time with C{clock} (the real reactor unless
    told), noting every connection and every timer asked of it, so that a
    test can tell that the store used it and not the global reactor.
    """

    def __init__(self, clock=reactor) -> None:
        self.clock = clock
        self.connections: list[tuple] = []
        self.delays: list[float] = []

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        self.connections.append(("tcp", host, port))
        return reactor.connectTCP(host, port, factory, timeout, bindAddress)

    def connectUNIX(self, address, factory, timeout=30, checkPID=0):
        self.connections.append(("unix", address))
        return reactor.connectUNIX(address, factory, timeout, checkPID)

    def callLater(self, delay, f, *args, **kwargs):
        self.delays.append(delay)
        return self.clock.callLater(delay, f, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def __getattr__(self, name):
        return getattr(reactor, name)


@attrs.define
class PinnedTime:
    """
    A clock that tells the time it is set to, and runs timers on the real
    reactor (connections need them to run).
    """

    now: float

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay, f, *args, **kwargs):
        return reactor.callLater(delay, f, *args, **kwargs)


async def append(store, key: str, data) -> int:
    """
    Append as the stream's owner, the only worker the buffer takes chunks
    from.
    """
    await store.acquire_owner(key)
    return await store.buffer.append(key, data)


def chunks(store, key: str, start: int = 1, limit: int = 100) -> Deferred:
    return store.buffer.read(key, start, limit)


async def indices(store, key: str, start: int = 1, limit: int = 100) -> list[int]:
    return [index for index, _ in await chunks(store, key, start, limit)]


# The reactor a Redis store is given


@pytest.mark.parametrize("over", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_redis_store_connects_and_times_out_through_its_reactor(redis_server, over):
    """
    Every connection (two pools and the subscriber) is made through the
    store's reactor, and every operation is timed out on it, twice: by the
    store and by the protocol waiting for the reply.
    """
    url = redis_server.url if over == "tcp" else redis_server.unix_url
    proxy = ReactorProxy()
    store = RedisStore(url=url, reactor=proxy, worker_id=WORKER, op_timeout=4.25, **SETTINGS)
    store.startService()
    try:
        await eventually(lambda: store.available, what="the store connected")
        await subscribed(store)
        if over == "tcp":
            assert proxy.connections == [("tcp", "127.0.0.1", redis_server.port)] * 4
        else:
            assert proxy.connections == [("unix", redis_server.socket_path)] * 4
        before = len(proxy.delays)
        await store.put_stream(KEY, {"status": "started"})
        await store.get_stream(KEY)
        assert proxy.delays[before:].count(4.25) == 4
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_op_timeout_runs_on_the_injected_clock():
    """
    With Redis unreachable, a call fails with L{Unavailable} when the
    store's clock says C{op_timeout} has passed, whatever the real time.
    """
    clock = Clock()
    store = RedisStore(
        url=f"redis://127.0.0.1:{free_port()}/0",
        reactor=ReactorProxy(clock),
        worker_id=WORKER,
        op_timeout=0.1,
        **SETTINGS,
    )
    store.startService()
    try:
        answer = store.get_stream(KEY)
        await deferLater(reactor, 0.3, lambda: None)
        assert not answer.called
        clock.advance(0.099)
        assert not answer.called
        clock.advance(0.001)
        with pytest.raises(Unavailable):
            await answer
    finally:
        await store.stopService()


# Every method answers with a Deferred


@pytest_twisted.ensureDeferred
async def test_every_method_returns_a_deferred(store):
    """
    Callers chain callbacks on every answer, so none may be a coroutine or
    a plain value.
    """
    calls = [
        lambda: store.put_stream(KEY, {"status": "started"}),
        lambda: store.get_stream(KEY),
        lambda: store.list_streams(),
        lambda: store.add_player(KEY, "c1", {"address": "a"}),
        lambda: store.update_player(KEY, "c1", {"address": "b"}),
        lambda: store.list_players(KEY),
        lambda: store.remove_player(KEY, "c1"),
        lambda: store.set_last_disconnect(KEY, 1.5),
        lambda: store.get_last_disconnect(KEY),
        lambda: store.acquire_owner(KEY),
        lambda: store.renew_owner(KEY),
        lambda: store.get_owner(KEY),
        lambda: store.publish(KEY, "test"),
        lambda: store.buffer.append(KEY, b"G" * 188),
        lambda: store.buffer.read(KEY, 1, 10),
        lambda: store.buffer.latest(KEY),
        lambda: store.buffer.delete(KEY),
        lambda: store.release_owner(KEY),
        lambda: store.delete_stream(KEY),
    ]
    for call in calls:
        answer = call()
        assert isinstance(answer, Deferred), call
        await answer


@pytest_twisted.ensureDeferred
async def test_available_when_up(store):
    assert store.available is True
    assert store.kind in ("memory", "redis")


# Stream metadata


@pytest_twisted.ensureDeferred
async def test_put_and_get_stream(store):
    assert await store.get_stream(KEY) is None
    await store.put_stream(KEY, {"status": "starting", "container_id": "engine-a", "bytes_in": 0})
    meta = await store.get_stream(KEY)
    assert as_text(meta) == {"key": KEY, "status": "starting", "container_id": "engine-a", "bytes_in": "0"}


@pytest_twisted.ensureDeferred
async def test_put_stream_merges_fields(store):
    await store.put_stream(KEY, {"status": "starting", "container_id": "engine-a"})
    await store.put_stream(KEY, {"status": "started", "started_at": 12.5})
    meta = await store.get_stream(KEY)
    assert as_text(meta) == {
        "key": KEY,
        "status": "started",
        "container_id": "engine-a",
        "started_at": "12.5",
    }
    assert float(meta["started_at"]) == 12.5


@pytest_twisted.ensureDeferred
async def test_list_streams_carries_each_key(store):
    assert await store.list_streams() == []
    await store.put_stream(KEY, {"status": "started"})
    await store.put_stream(OTHER_KEY, {"status": "starting"})
    listed = await store.list_streams()
    assert sorted((s["key"], s["status"]) for s in listed) == [
        (KEY, "started"),
        (OTHER_KEY, "starting"),
    ]


@pytest_twisted.ensureDeferred
async def test_only_the_owner_may_append(stores, store):
    """
    A worker without the lease (a stale owner, say) is refused, so its
    chunks cannot land among the owner's.
    """
    peer = await stores.make(PEER)
    assert await peer.acquire_owner(KEY)
    with pytest.raises(NotOwner):
        await store.buffer.append(KEY, b"G" * 188)
    assert await store.buffer.latest(KEY) == 0
    assert await peer.buffer.append(KEY, b"G" * 188) == 1


async def fill(store, key: str) -> None:
    """
    Give stream C{key} something of every kind the store keeps.
    """
    await store.put_stream(key, {"status": "started"})
    await store.add_player(key, "c1", {"address": "127.0.0.1"})
    await store.add_player(key, "c2", {"address": "127.0.0.2"})
    await store.set_last_disconnect(key, 3.25)
    for n in range(3):
        await append(store, key, bytes([0x47]) * 188)
    await store.segments.add(key, f"segment of {key}", 4)


@pytest_twisted.ensureDeferred
async def test_delete_stream_forgets_everything(store, redis_server_or_none):
    await fill(store, KEY)
    await fill(store, OTHER_KEY)
    assert await store.get_owner(KEY) == store.worker_id
    await store.delete_stream(KEY)

    assert await store.get_stream(KEY) is None
    assert await store.list_players(KEY) == {}
    assert await store.get_last_disconnect(KEY) is None
    assert await store.buffer.latest(KEY) == 0
    assert await chunks(store, KEY) == []
    assert await store.get_owner(KEY) is None
    assert await store.segments.list(KEY) == []
    assert await store.segments.list(OTHER_KEY) == [f"segment of {OTHER_KEY}"]
    assert [s["key"] for s in await store.list_streams()] == [OTHER_KEY]
    assert len(await store.list_players(OTHER_KEY)) == 2
    assert await store.buffer.latest(OTHER_KEY) == 3
    if redis_server_or_none is not None:
        client = redis_server_or_none.client()
        assert client.keys(keys.stream(KEY) + "*") == []
        client.close()


@pytest_twisted.ensureDeferred
async def test_delete_stream_leaves_another_workers_lease(stores, store):
    peer = await stores.make(PEER)
    await fill(store, KEY)
    # The lease passed to another worker before this one deleted the stream.
    assert await store.release_owner(KEY)
    assert await peer.acquire_owner(KEY)
    await store.delete_stream(KEY)
    assert await store.get_stream(KEY) is None
    assert await store.get_owner(KEY) == PEER


# HLS segments


@pytest_twisted.ensureDeferred
async def test_segments_keep_the_newest_for_every_worker(stores, store):
    peer = await stores.make(PEER)
    assert await store.segments.list(KEY) == []
    for n in range(6):
        await store.segments.add(KEY, f"segment {n}", 4)
    # Oldest first, the newest four, the same for another worker.
    newest = [f"segment {n}" for n in range(2, 6)]
    assert await store.segments.list(KEY) == newest
    assert await peer.segments.list(KEY) == newest
    assert await store.segments.list(OTHER_KEY) == []


@pytest_twisted.ensureDeferred
async def test_segments_expire_with_the_chunks(stores, redis_server_or_none):
    if redis_server_or_none is None:
        pytest.skip("the embedded store forgets segments with the stream")
    store = await stores.make(chunk_ttl=30.0)
    await store.segments.add(KEY, "segment 0", 4)
    client = redis_server_or_none.client()
    try:
        assert 0 < client("PTTL", keys.hls_segments(KEY)) <= 30_000
    finally:
        client.close()


# Clients


@pytest_twisted.ensureDeferred
async def test_add_and_list_clients(store):
    assert await store.list_players(KEY) == {}
    await store.add_player(KEY, "c1", {"address": "127.0.0.1", "bytes_sent": 0})
    await store.add_player(KEY, "c2", {"address": "127.0.0.2", "connected_at": 1.5})
    clients = await store.list_players(KEY)
    assert {cid: as_text(f) for cid, f in clients.items()} == {
        "c1": {"address": "127.0.0.1", "bytes_sent": "0"},
        "c2": {"address": "127.0.0.2", "connected_at": "1.5"},
    }


@pytest_twisted.ensureDeferred
async def test_add_client_again_replaces_its_fields(store):
    """
    Adding is an upsert: the client is written whole, as the heartbeat
    round does to restore a client the store lost.
    """
    await store.add_player(KEY, "c1", {"address": "a", "user_agent": "vlc"})
    await store.add_player(KEY, "c1", {"address": "b"})
    clients = await store.list_players(KEY)
    assert list(clients) == ["c1"]
    assert as_text(clients["c1"]) == {"address": "b"}


@pytest_twisted.ensureDeferred
async def test_update_client_merges(store):
    await store.add_player(KEY, "c1", {"address": "a", "bytes_sent": 0})
    await store.update_player(KEY, "c1", {"bytes_sent": 188, "last_heartbeat": 2.5})
    clients = await store.list_players(KEY)
    assert as_text(clients["c1"]) == {"address": "a", "bytes_sent": "188", "last_heartbeat": "2.5"}


@pytest_twisted.ensureDeferred
async def test_update_does_not_resurrect_a_removed_client(store):
    await store.add_player(KEY, "c1", {"address": "a"})
    await store.remove_player(KEY, "c1")
    await store.update_player(KEY, "c1", {"bytes_sent": 188})
    await store.update_player(KEY, "never-added", {"bytes_sent": 188})
    assert await store.list_players(KEY) == {}


@pytest_twisted.ensureDeferred
async def test_remove_client_returns_how_many_are_left(store):
    for cid in ("c1", "c2", "c3"):
        await store.add_player(KEY, cid, {"address": cid})
    assert await store.remove_player(KEY, "c2") == 2
    assert await store.remove_player(KEY, "c2") == 2
    assert await store.remove_player(KEY, "unknown") == 2
    assert sorted(await store.list_players(KEY)) == ["c1", "c3"]
    assert await store.remove_player(KEY, "c1") == 1
    assert await store.remove_player(KEY, "c3") == 0
    assert await store.list_players(KEY) == {}
    assert await store.remove_player(OTHER_KEY, "c1") == 0


@pytest_twisted.ensureDeferred
async def test_clients_are_per_stream(store):
    await store.add_player(KEY, "c1", {"address": "a"})
    await store.add_player(OTHER_KEY, "c2", {"address": "b"})
    assert list(await store.list_players(KEY)) == ["c1"]
    assert list(await store.list_players(OTHER_KEY)) == ["c2"]


@pytest_twisted.ensureDeferred
async def test_client_without_heartbeat_stays_listed_as_a_ghost(redis_stores):
    """
    A client whose worker stopped writing it keeps its place in the set but
    loses its fields: with no heartbeat, it is a ghost for the heartbeat
    round to remove.  (The embedded store's workers cannot die alone: this
    is Redis only.)
    """
    store = await redis_stores.make(ghost_client_timeout=0.3)
    await store.add_player(KEY, "c1", {"address": "a", "last_heartbeat": 1.0})
    await until(
        lambda: store.list_players(KEY), lambda found: found == {"c1": {}}, what="c1 to lose its fields"
    )
    await store.update_player(KEY, "c1", {"bytes_sent": 188})
    assert await store.list_players(KEY) == {"c1": {}}
    assert await store.remove_player(KEY, "c1") == 0


# Last disconnect


@pytest_twisted.ensureDeferred
async def test_last_disconnect(store):
    assert await store.get_last_disconnect(KEY) is None
    when = 1712345678.123456
    await store.set_last_disconnect(KEY, when)
    assert await store.get_last_disconnect(KEY) == when
    await store.set_last_disconnect(KEY, None)
    assert await store.get_last_disconnect(KEY) is None
    await store.set_last_disconnect(KEY, None)
    assert await store.get_last_disconnect(KEY) is None


# The ring buffer


@pytest_twisted.ensureDeferred
async def test_append_numbers_chunks_from_one(store):
    assert await store.buffer.latest(KEY) == 0
    assert [await append(store, KEY, b"G%d" % n) for n in range(4)] == [1, 2, 3, 4]
    assert await store.buffer.latest(KEY) == 4
    assert await append(store, OTHER_KEY, b"G") == 1
    assert await store.buffer.latest(KEY) == 4


@pytest_twisted.ensureDeferred
async def test_read_from_an_index_with_a_limit(store):
    for n in range(1, 5):
        await append(store, KEY, b"chunk-%d" % n)
    assert await chunks(store, KEY, 1, 100) == [(n, b"chunk-%d" % n) for n in range(1, 5)]
    assert await chunks(store, KEY, 2, 2) == [(2, b"chunk-2"), (3, b"chunk-3")]
    assert await chunks(store, KEY, 4, 10) == [(4, b"chunk-4")]
    assert await chunks(store, KEY, 5, 10) == []
    assert await chunks(store, KEY, 1, 0) == []
    assert await chunks(store, OTHER_KEY, 1, 10) == []


@pytest_twisted.ensureDeferred
async def test_buffer_keeps_the_last_buffer_chunks(store):
    for n in range(1, 9):
        await append(store, KEY, b"chunk-%d" % n)
    assert await indices(store, KEY) == [4, 5, 6, 7, 8]
    assert await store.buffer.latest(KEY) == 8


@pytest_twisted.ensureDeferred
async def test_read_skips_chunks_that_left_the_buffer(store):
    """
    A reader that fell behind gets the oldest chunks still there, up to its
    limit, not an empty answer.
    """
    for n in range(1, 9):
        await append(store, KEY, b"chunk-%d" % n)
    assert await chunks(store, KEY, 1, 2) == [(4, b"chunk-4"), (5, b"chunk-5")]


@pytest_twisted.ensureDeferred
async def test_read_of_a_long_window(stores):
    """
    A read may span more chunks than one Redis command is given at once.
    """
    store = await stores.make(buffer_chunks=1200)
    for n in range(1, 1101):
        await append(store, KEY, b"%d" % n)
    found = await chunks(store, KEY, 1, 2000)
    assert [index for index, _ in found] == list(range(1, 1101))
    assert [data for _, data in found] == [b"%d" % n for n in range(1, 1101)]
    assert [index for index, _ in await chunks(store, KEY, 600, 550)] == list(range(600, 1101))


@pytest_twisted.ensureDeferred
async def test_chunks_expire_after_chunk_ttl(stores):
    store = await stores.make(chunk_ttl=0.3)
    await append(store, KEY, b"old")
    assert await indices(store, KEY) == [1]
    await until(lambda: indices(store, KEY), lambda found: found == [], what="chunk 1 to expire")
    assert await append(store, KEY, b"new") == 2
    assert await chunks(store, KEY) == [(2, b"new")]
    assert await store.buffer.latest(KEY) == 2


def test_memory_chunks_expire_exactly_after_chunk_ttl():
    """
    On a L{Clock}, the embedded buffer's expiry can be pinned down.
    """
    clock = Clock()
    store = MemoryStore(clock, buffer_chunks=5, chunk_ttl=10, worker_id=WORKER)
    store.acquire_owner(KEY)
    store.buffer.append(KEY, b"first")
    clock.advance(6)
    store.buffer.append(KEY, b"second")
    clock.advance(4)
    assert [i for i, _ in store.buffer.read(KEY, 1, 10).result] == [1, 2]
    clock.advance(0.001)
    assert [i for i, _ in store.buffer.read(KEY, 1, 10).result] == [2]
    assert store.buffer.count(KEY) == 1
    clock.advance(6)
    assert store.buffer.read(KEY, 1, 10).result == []
    assert store.buffer.latest(KEY).result == 2


@pytest_twisted.ensureDeferred
async def test_buffer_delete_forgets_chunks_and_index_only(store):
    await fill(store, KEY)
    await append(store, OTHER_KEY, b"other")
    await store.buffer.delete(KEY)
    assert await store.buffer.latest(KEY) == 0
    assert await chunks(store, KEY) == []
    assert (await store.get_stream(KEY))["status"] == "started"
    assert len(await store.list_players(KEY)) == 2
    assert await store.get_last_disconnect(KEY) == 3.25
    assert await chunks(store, OTHER_KEY) == [(1, b"other")]
    assert await append(store, KEY, b"again") == 1


@pytest_twisted.ensureDeferred
async def test_append_takes_a_memoryview(store):
    framed = b"5\r\nGabcd\r\n"
    view = memoryview(framed)[3:-2]
    index = await append(store, KEY, view)
    [(found_index, data)] = await chunks(store, KEY)
    assert found_index == index
    assert type(data) is bytes
    assert data == b"Gabcd"


@pytest_twisted.ensureDeferred
async def test_large_chunk_round_trips(store):
    data = bytes(range(256)) * 4096
    await append(store, KEY, data)
    [(_, found)] = await chunks(store, KEY)
    assert type(found) is bytes
    assert found == data


_sequence = itertools.count()

ASCII = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1)
DIGITS = st.text(alphabet="0123456789-.", min_size=1)
CHUNK = st.one_of(
    st.binary(min_size=1, max_size=2048),
    ASCII.map(str.encode),
    DIGITS.map(str.encode),
)


@pytest.fixture
def rewrapped(request):
    """
    pytest-twisted wraps a hypothesis test's inner test each time it runs
    it; the parametrised runs share one function, so the second run would
    wrap the first run's wrapper and fail.  Put the original back after
    each run.
    """
    hypothesis = request.function.hypothesis
    original = hypothesis.inner_test
    yield
    hypothesis.inner_test = original


@pytest.mark.usefixtures("rewrapped")
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.lists(CHUNK, min_size=1, max_size=6))
@example(data=[b"1", b"-1", b"1.5", b"OK", b"+OK\r\n", b"$-1\r\n", b"nil"])
@example(data=[b"\x00", b"\xff\xfe", "\u00e9".encode(), b"\r\n", b"%d%s"])
@pytest_twisted.ensureDeferred
async def test_chunks_come_back_as_identical_bytes(store, data):
    """
    Whatever the bytes (plain ASCII digits included, which a decoding
    client would turn into numbers or text), a chunk comes back as the same
    C{bytes}.  Each example writes a stream of its own.
    """
    key = "%040x" % next(_sequence)
    kept = data[-SETTINGS["buffer_chunks"] :]
    written = [await append(store, key, chunk) for chunk in data]
    found = await chunks(store, key)
    assert [index for index, _ in found] == written[-len(kept) :]
    for (_, got), chunk in zip(found, kept):
        assert type(got) is bytes
        assert got == chunk
    await store.buffer.delete(key)


# The owner lease


@pytest_twisted.ensureDeferred
async def test_acquire_owner_once(stores, store):
    peer = await stores.make(PEER)
    assert await store.get_owner(KEY) is None
    assert await store.acquire_owner(KEY) is True
    assert await store.acquire_owner(KEY) is False
    assert await peer.acquire_owner(KEY) is False
    assert await store.get_owner(KEY) == WORKER
    assert await peer.get_owner(KEY) == WORKER
    assert await peer.acquire_owner(OTHER_KEY) is True
    assert await store.get_owner(OTHER_KEY) == PEER


@pytest_twisted.ensureDeferred
async def test_renew_owner_only_for_the_owner(stores, store):
    peer = await stores.make(PEER)
    assert await store.renew_owner(KEY) is False
    await store.acquire_owner(KEY)
    assert await store.renew_owner(KEY) is True
    assert await peer.renew_owner(KEY) is False
    assert await store.get_owner(KEY) == WORKER


@pytest_twisted.ensureDeferred
async def test_release_is_compare_and_delete(stores, store):
    peer = await stores.make(PEER)
    await store.acquire_owner(KEY)
    assert await peer.release_owner(KEY) is False
    assert await store.get_owner(KEY) == WORKER
    assert await store.release_owner(KEY) is True
    assert await store.get_owner(KEY) is None
    assert await store.release_owner(KEY) is False
    assert await peer.acquire_owner(KEY) is True
    assert await store.release_owner(KEY) is False
    assert await store.get_owner(KEY) == PEER


@pytest_twisted.ensureDeferred
async def test_owner_lease_expires_unless_renewed(redis_stores):
    """
    A worker that dies stops renewing: its lease lapses and another worker
    may take the stream.  (One process holds the embedded store, so its
    owner never dies alone: this is Redis only.)
    """
    store = await redis_stores.make(owner_lease=0.3)
    peer = await redis_stores.make(PEER, owner_lease=0.3)
    assert await store.acquire_owner(KEY)
    await until(lambda: store.get_owner(KEY), lambda owner: owner is None, what="the lease to lapse")
    assert await store.renew_owner(KEY) is False
    assert await peer.acquire_owner(KEY) is True
    assert await store.get_owner(KEY) == PEER


@pytest_twisted.ensureDeferred
async def test_renewing_extends_the_lease_and_the_streams_keys(redis_stores, redis_server):
    store = await redis_stores.make(owner_lease=2.0)
    await fill(store, KEY)
    await store.acquire_owner(KEY)
    client = redis_server.client()
    try:
        client("PEXPIRE", keys.owner(KEY), 100)
        client("PEXPIRE", keys.metadata(KEY), 100)
        assert await store.renew_owner(KEY) is True
        assert 1000 < client("PTTL", keys.owner(KEY)) <= 2000
        for name in (keys.metadata(KEY), keys.buffer_index(KEY), keys.clients(KEY)):
            assert 1000 < client("PTTL", name) <= store.stream_ttl_ms, name
    finally:
        client.close()


# Events


@pytest_twisted.ensureDeferred
async def test_publish_reaches_listeners(store):
    heard = Heard()
    store.listen(KEY, heard)
    before = reactor.seconds()
    await store.publish(KEY, "client_connected", client_id="c1", remaining=2)
    [event] = await heard.wait("client_connected")
    assert event == {
        "event": "client_connected",
        "worker_id": WORKER,
        "ts": event["ts"],
        "client_id": "c1",
        "remaining": 2,
    }
    assert before - 1 <= event["ts"] <= reactor.seconds() + 1
    store.unlisten(KEY, heard)


@pytest_twisted.ensureDeferred
async def test_events_reach_other_workers(stores, store):
    peer = await stores.make(PEER)
    mine, theirs = Heard(), Heard()
    store.listen(KEY, mine)
    peer.listen(KEY, theirs)
    await store.publish(KEY, "stream_stopping")
    await peer.publish(KEY, "client_disconnected", remaining=0)
    for heard in (mine, theirs):
        [stopping] = await heard.wait("stream_stopping")
        [gone] = await heard.wait("client_disconnected")
        assert stopping["worker_id"] == WORKER
        assert gone["worker_id"] == PEER
        assert gone["remaining"] == 0


@pytest_twisted.ensureDeferred
async def test_unlisten_and_events_are_per_stream(store):
    kept, dropped, other = Heard(), Heard(), Heard()
    for heard in (kept, dropped):
        store.listen(KEY, heard)
    store.listen(OTHER_KEY, other)
    await store.publish(KEY, "first")
    await kept.wait("first")
    await dropped.wait("first")
    store.unlisten(KEY, dropped)
    store.unlisten(KEY, dropped)
    await store.publish(KEY, "second")
    await kept.wait("second")
    assert [e["event"] for e in dropped.events] == ["first"]
    await store.publish(OTHER_KEY, "third")
    await other.wait("third")
    assert [e["event"] for e in other.events] == ["third"]
    assert [e["event"] for e in kept.events] == ["first", "second"]


@pytest_twisted.ensureDeferred
async def test_append_announces_chunk_added(stores, store):
    peer = await stores.make(PEER)
    heard = Heard()
    peer.listen(KEY, heard)
    for n in range(3):
        await append(store, KEY, b"G" * 188)
    added = await heard.wait("chunk_added", 3)
    assert [e["index"] for e in added] == [1, 2, 3]
    assert {e["worker_id"] for e in added} == {WORKER}
    assert all(isinstance(e["ts"], float) for e in added)


@pytest_twisted.ensureDeferred
async def test_chunk_added_whatever_the_worker_id(stores):
    """
    The event is JSON however the worker id reads, format directives and
    look-alike fields included.
    """
    worker = 'w%d%s "index": 0'
    store = await stores.make(worker)
    heard = Heard()
    store.listen(KEY, heard)
    await append(store, KEY, b"G")
    await append(store, KEY, b"G")
    added = await heard.wait("chunk_added", 2)
    assert [(e["worker_id"], e["index"]) for e in added] == [(worker, 1), (worker, 2)]


@pytest_twisted.ensureDeferred
async def test_chunk_added_message_on_the_wire(redis_stores, redis_server):
    """
    What any Redis client subscribed to a stream's channel gets: a JSON
    object of exactly the event, the worker id as given, the time as the
    store's clock told it (a float, to the microsecond, a whole second
    included) and the index as an integer.
    """
    worker = 'w%d%s "index": 0, \\ \u00e9'
    clock = PinnedTime(1712345678.123456)
    store = await redis_stores.make(worker, on=ReactorProxy(clock))
    subscriber = redis_server.client()
    try:
        assert subscriber("SUBSCRIBE", keys.events(KEY))[0] == b"subscribe"
        await append(store, KEY, b"G")
        clock.now = 1712345679.0
        await append(store, KEY, b"G")
        received = [subscriber.receive() for _ in range(2)]
    finally:
        subscriber.close()
    for kind, channel, _ in received:
        assert (kind, channel) == (b"message", keys.events(KEY).encode())
    messages = [json.loads(message) for _, _, message in received]
    assert messages == [
        {"event": "chunk_added", "worker_id": worker, "ts": 1712345678.123456, "index": 1},
        {"event": "chunk_added", "worker_id": worker, "ts": 1712345679.0, "index": 2},
    ]
    for message in messages:
        assert [type(message[name]) for name in ("event", "worker_id", "ts", "index")] == [
            str,
            str,
            float,
            int,
        ]


# Redis going away


@pytest_twisted.ensureDeferred
async def test_calls_fail_with_unavailable_while_redis_is_down(redis_stores, redis_server):
    """
    Without Redis a call fails with L{Unavailable} after C{op_timeout}
    instead of hanging; when Redis is back, the store is too, events
    included.
    """
    store = await redis_stores.make(op_timeout=0.3)
    redis_server.stop()
    await eventually(lambda: not store.available, timeout=EXPIRY_WAIT, what="the store noticed")
    with pytest.raises(Unavailable):
        await store.get_stream(KEY)
    with pytest.raises(Unavailable):
        await append(store, KEY, b"G")
    redis_server.start()
    await eventually(lambda: store.available, timeout=EXPIRY_WAIT + 5, what="the store reconnected")
    await subscribed(store)
    assert await append(store, KEY, b"G") == 1


@pytest_twisted.ensureDeferred
async def test_stopped_store_fails_with_unavailable(redis_stores):
    store = await redis_stores.make()
    await store.stopService()
    assert store.available is False
    with pytest.raises(Unavailable):
        await store.get_owner(KEY)


# Redis refusing to serve for a while


async def writes_fail_with_unavailable(store, reason: str) -> None:
    """
    Every kind of write (a plain command, a script, on either connection)
    fails with L{Unavailable} for C{reason}, not with Redis's error reply.
    """
    writes = [
        lambda: store.set_last_disconnect(KEY, 1.5),
        lambda: store.put_stream(KEY, {"status": "stopping"}),
        lambda: store.add_player(KEY, "c2", {"address": "b"}),
        lambda: store.acquire_owner(OTHER_KEY),
    ]
    for write in writes:
        with pytest.raises(Unavailable, match=reason) as refused:
            await write()
        assert isinstance(refused.value.__cause__, txredisapi.ResponseError)


@pytest_twisted.ensureDeferred
async def test_out_of_memory_is_unavailable(redis_stores, redis_server):
    store = await redis_stores.make()
    await store.put_stream(KEY, {"status": "started"})
    await append(store, KEY, b"G")
    admin = redis_server.client()
    [_, policy] = admin("CONFIG", "GET", "maxmemory-policy")
    admin("CONFIG", "SET", "maxmemory-policy", "noeviction")
    admin("CONFIG", "SET", "maxmemory", "1")
    try:
        await writes_fail_with_unavailable(store, "OOM")
        with pytest.raises(Unavailable, match="OOM"):
            await store.buffer.append(KEY, b"G")
        assert (await store.get_stream(KEY))["status"] == "started"
    finally:
        admin("CONFIG", "SET", "maxmemory", "0")
        admin("CONFIG", "SET", "maxmemory-policy", policy)
        admin.close()
    await store.put_stream(KEY, {"status": "stopping"})
    assert await store.buffer.append(KEY, b"G") == 2


@pytest_twisted.ensureDeferred
async def test_read_only_replica_is_unavailable(redis_stores, redis_server, other_redis_server):
    """
    A master demoted to a replica (as by a failover) refuses writes until
    it is promoted again.
    """
    store = await redis_stores.make()
    admin = redis_server.client()
    admin("REPLICAOF", "127.0.0.1", other_redis_server.port)
    try:
        await eventually(
            lambda: b"master_link_status:up" in admin("INFO", "replication"),
            what="the replica in sync",
        )
        await writes_fail_with_unavailable(store, "READONLY")
    finally:
        admin("REPLICAOF", "NO", "ONE")
        admin.close()
    await store.put_stream(KEY, {"status": "stopping"})
    assert (await store.get_stream(KEY))["status"] == "stopping"


@pytest_twisted.ensureDeferred
async def test_busy_script_is_unavailable(redis_stores, redis_server):
    """
    Redis busy with a script past its time limit answers BUSY to everyone
    else until the script is killed.
    """
    store = await redis_stores.make()
    admin, looping = redis_server.client(), redis_server.client()
    [_, limit] = admin("CONFIG", "GET", "lua-time-limit")
    admin("CONFIG", "SET", "lua-time-limit", "10")
    looping.send("EVAL", "while true do end", 0)
    try:
        # Calls are answered until the script starts, then refused.
        with pytest.raises(Unavailable, match="BUSY"):
            deadline = reactor.seconds() + EXPIRY_WAIT
            while reactor.seconds() < deadline:
                await store.get_stream(KEY)
    finally:
        admin("SCRIPT", "KILL")
        with pytest.raises(RuntimeError, match="killed"):
            looping.receive()
        admin("CONFIG", "SET", "lua-time-limit", limit)
        admin.close()
        looping.close()
    assert await store.get_stream(KEY) is None


@pytest.mark.parametrize(
    "reply",
    [
        "LOADING Redis is loading the dataset in memory",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.",
        "READONLY You can't write against a read only replica. script: 0123, on @user_script:3.",
        "ERR Error running script (call to f_0123): @user_script:3: @user_script: 3: -OOM command not allowed",
    ],
)
def test_replies_of_a_redis_that_cannot_serve_now_are_unavailable(reply):
    with pytest.raises(Unavailable):
        _unavailable(Failure(txredisapi.ResponseError(reply)))


@pytest.mark.parametrize(
    "reply",
    [
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "BUSYKEY Target key name already exists.",
        "ERR unknown command 'NOPE'",
        "ERR Error running script (call to f_0123): @user_script:1: Script attempted to access nonexistent global variable 'OOM'",
    ],
)
def test_other_error_replies_stay_themselves(reply):
    failure = Failure(txredisapi.ResponseError(reply))
    assert _unavailable(failure) is failure


@pytest_twisted.ensureDeferred
async def test_error_reply_of_a_bug_is_not_unavailable(redis_stores, redis_server):
    store = await redis_stores.make()
    admin = redis_server.client()
    admin("SET", keys.metadata(KEY), "not a hash")
    admin.close()
    with pytest.raises(txredisapi.ResponseError, match="WRONGTYPE"):
        await store.get_stream(KEY)
