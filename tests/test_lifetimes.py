"""
Lifetimes: nothing a stream starts outlives it.  After every way a stream
stops (idle, DELETE, a failed start, hand-over, shutdown) its clock has no
delayed call left and it has no background work pending, on both stores;
periodic work survives its failures; the idle check and a cancelled join
leave the stream and its lease as they should.

The stream logic runs on a L{Clock}; with Redis, the store's own I/O runs on
the real reactor, and the test awaits it rather than polling.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, LogLevel, globalLogPublisher

from acestream_proxy.background import QUIET, Tasks, periodic
from acestream_proxy.config import Config, Tuning
from acestream_proxy.engine.registry import Engine, EngineRegistry
from acestream_proxy.errors import Unavailable
from acestream_proxy.service import make_store
from acestream_proxy.store.memory import MemoryStore
from acestream_proxy.store.redis import RedisStore
from acestream_proxy.stream.registry import StreamRegistry

from .fakes import FakeEngineAPI, FakeRequest, packets

KEY = "cd" * 20


async def registry_on(store_url, clock, **tuning):
    api = FakeEngineAPI()
    tuning = Tuning(**tuning)
    engines = EngineRegistry([Engine("engine-a", "http://127.0.0.1:6878", "127.0.0.1", 6878)], api)
    if store_url is None:
        store = _WrappableStore(clock, tuning.buffer_chunks, tuning.chunk_ttl, "worker-1")
    else:
        store = make_store(Config(redis=store_url, tuning=tuning), reactor, "worker-1")
        store.startService()
        await _until_available(store)
    registry = StreamRegistry(store, engines, api, clock, tuning, "worker-1")
    registry.startService()
    return registry, api, store


class _WrappableStore(MemoryStore):
    """
    The embedded store, whose calls a test may wrap one by one.
    """


async def _until_available(store) -> None:
    """
    The Redis store's connections come up on the real reactor: wait for
    them by asking it something.
    """
    await store.get_owner(KEY)


async def playing(registry, api) -> tuple:
    """
    A stream with one player, its engine body fed once; fire once the
    player is attached.
    """
    request = FakeRequest()
    attached = Deferred.fromCoroutine(registry.attach(KEY, "id", request))
    await _until(lambda: api.readers)
    api.readers[0].dataReceived(packets(0, 50))
    await attached
    return registry.streams[KEY], request


def assert_nothing_left(clock, registry, stream) -> None:
    assert stream._stopped.called
    assert stream.tasks.pending == set()
    assert not stream.running
    assert registry.streams == {}
    assert clock.getDelayedCalls() == []


async def stopped(stream) -> None:
    await stream.stopService()


async def shut_down(clock, registry, store) -> None:
    """
    Stop the registry and the Redis store.  Shutdown gives the players'
    connections a few seconds of the registry's clock to drain, and the
    store's I/O needs the real reactor.
    """
    for stream in registry.streams.values():
        for player in stream.players:
            # What the HTTP channel does for a real player's transport.
            player.request.transport.registerProducer(player, True)
    finished = []
    registry.stopService().addBoth(finished.append)
    # Each round gives the store a millisecond of real I/O: 10 s of real
    # time at most, however loaded the machine is.
    for _ in range(10_000):
        if finished:
            break
        clock.advance(0.02)
        await deferLater(reactor, 0.001, lambda: None)
    assert finished
    if isinstance(store, RedisStore):
        await store.stopService()


@pytest.fixture(params=["memory", "redis"])
def store_url(request):
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_server").url


@pytest_twisted.ensureDeferred
async def test_idle_stop_leaves_nothing(store_url):
    clock = Clock()
    registry, api, store = await registry_on(store_url, clock, cleanup_grace=5)
    stream, request = await playing(registry, api)
    request.producer.stopProducing()
    await stream.players.tasks.settle()
    clock.advance(5)
    await stopped(stream)
    assert api.stops == ["session-1"]
    await shut_down(clock, registry, store)
    assert_nothing_left(clock, registry, stream)


@pytest_twisted.ensureDeferred
async def test_delete_leaves_nothing(store_url):
    clock = Clock()
    registry, api, store = await registry_on(store_url, clock)
    stream, request = await playing(registry, api)
    # Packets still gathering into a chunk when the stream stops: dropped,
    # and their timer with them.
    api.readers[0].dataReceived(packets(50, 5))
    assert clock.getDelayedCalls()
    await registry.stop_stream(KEY, "stopped through the API")
    assert api.stops == ["session-1"]
    await shut_down(clock, registry, store)
    assert_nothing_left(clock, registry, stream)


@pytest_twisted.ensureDeferred
async def test_failed_start_leaves_nothing(store_url):
    clock = Clock()
    registry, api, store = await registry_on(store_url, clock, first_byte_timeout=20)
    attached = Deferred.fromCoroutine(registry.attach(KEY, "id", FakeRequest()))
    attached.addErrback(lambda f: None)
    await _until(lambda: KEY in registry.streams and api.readers)
    stream = registry.streams[KEY]
    clock.advance(20)
    await stopped(stream)
    assert api.stops == ["session-1"]
    await shut_down(clock, registry, store)
    assert_nothing_left(clock, registry, stream)


@pytest_twisted.ensureDeferred
async def test_hand_over_leaves_nothing(store_url):
    clock = Clock()
    registry, api, store = await registry_on(store_url, clock)
    stream, request = await playing(registry, api)
    await stream.stop("shutting down", handover=True)
    # Handed over: the engine session is the next owner's to reuse.
    assert api.stops == []
    assert await store.get_owner(KEY) is None
    await shut_down(clock, registry, store)
    assert_nothing_left(clock, registry, stream)


@pytest_twisted.ensureDeferred
async def test_shutdown_leaves_nothing(store_url):
    clock = Clock()
    registry, api, store = await registry_on(store_url, clock)
    stream, request = await playing(registry, api)
    await shut_down(clock, registry, store)
    assert api.stops == ["session-1"]
    assert request.producer is None
    assert registry.tasks.pending == set()
    assert_nothing_left(clock, registry, stream)


def at_once(coroutine):
    """
    The result of a coroutine that, on the embedded store, never waits.
    """
    d = Deferred.fromCoroutine(coroutine)
    assert d.called
    return d.result


async def _until(predicate) -> None:
    """
    Give the store's I/O (on the real reactor) the time it needs, a
    millisecond at a time and 10 s at most, until C{predicate} holds: the
    start awaits the store before it reaches the engine.
    """
    for _ in range(10_000):
        if predicate():
            return
        await deferLater(reactor, 0.001, lambda: None)
    raise AssertionError("the stream never reached its engine")


# --- periodic work survives its failures ---------------------------------------


def test_a_failing_periodic_call_is_logged_once_and_keeps_running():
    clock = Clock()
    calls = []
    events = []

    def flaky():
        calls.append(clock.seconds())
        if len(calls) <= 3:
            raise ValueError("the store said no")

    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        tasks = Tasks(Logger(), clock, "flaky work")
        timer = periodic(1.0, flaky, clock, tasks)
        timer.startService()
        clock.pump([1.0] * 5)
        timer.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert calls == [0, 1, 2, 3, 4, 5]
    failures = [e for e in events if e.get("log_level") is LogLevel.critical]
    assert len(failures) == 1
    assert failures[0]["what"] == "flaky work"
    assert clock.getDelayedCalls() == []


def test_failures_are_reported_again_after_the_quiet_period():
    clock = Clock()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        tasks = Tasks(Logger(), clock, "flaky work")
        for _ in range(3):
            tasks.run(lambda: 1 / 0)
        clock.advance(QUIET)
        tasks.run(lambda: 1 / 0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if e.get("log_level") is LogLevel.critical]
    assert [f["quieted"] for f in failures] == [0, 2]


def test_a_lease_timer_survives_a_store_error_reply():
    """
    A Redis error reply (say from a demoted primary) used to end the lease
    loop for good; the lease timer now keeps renewing.
    """
    clock = Clock()
    registry, api, store = at_once(registry_on(None, clock, owner_lease=15))
    stream, request = at_once(playing(registry, api))
    renewals = []
    renew = store.renew_owner

    def failing_renew(key):
        renewals.append(clock.seconds())
        if len(renewals) == 1:
            raise RuntimeError("READONLY You can't write against a read only replica.")
        return renew(key)

    store.renew_owner = failing_renew
    clock.pump([5.0] * 3)
    assert len(renewals) == 3
    assert stream.live and not stream.stopping


# --- joins racing the idle check and the lease --------------------------------


class _Held:
    """
    Wraps a store method so that its next call waits until released.
    """

    def __init__(self, store, name):
        self.store, self.name = store, name
        self.original = getattr(store, name)
        self.waiting = None
        setattr(store, name, self)

    def __call__(self, *args):
        self.waiting = Deferred()
        result = self.original(*args)
        setattr(self.store, self.name, self.original)
        return self.waiting.addCallback(lambda _: result)

    def release(self):
        self.waiting.callback(None)


def test_a_player_who_joins_while_the_idle_check_awaits_the_store_keeps_the_stream():
    clock = Clock()
    registry, api, store = at_once(registry_on(None, clock, cleanup_grace=5, heartbeat_interval=100))
    stream, first = at_once(playing(registry, api))
    first.producer.stopProducing()
    held = _Held(store, "list_players")
    clock.advance(5)
    assert held.waiting is not None  # the idle check is waiting for the store
    second = FakeRequest()
    attached = Deferred.fromCoroutine(registry.attach(KEY, "id", second))
    assert attached.called
    held.release()
    assert not stream.stopping
    assert registry.streams[KEY] is stream
    api.readers[0].dataReceived(packets(50, 10))
    assert second.transport.value()
    # Past another grace: the stream goes on, for the player who came.
    clock.advance(cleanup_grace := 5)
    clock.advance(cleanup_grace)
    assert not stream.stopping
    assert api.stops == []


def test_a_join_cancelled_before_its_stream_exists_gives_the_lease_back():
    clock = Clock()
    registry, api, store = at_once(registry_on(None, clock))
    held = _Held(store, "get_stream")
    attached = Deferred.fromCoroutine(registry.attach(KEY, "id", FakeRequest()))
    assert held.waiting is not None
    assert store.get_owner(KEY).result == "worker-1"
    attached.cancel()
    attached.addErrback(lambda f: None)
    assert store.get_owner(KEY).result is None
    assert registry.streams == {}
    # The next player starts the stream at once.
    again = FakeRequest()
    attached = Deferred.fromCoroutine(registry.attach(KEY, "id", again))
    api.readers[0].dataReceived(packets(0, 10))
    assert attached.called and again.transport.value()


def test_a_store_that_cannot_serve_is_not_logged_by_every_task():
    """
    The store logs its outage once as it begins and once as it ends; the
    tasks that meet it while it lasts (lease, heartbeats, appends) keep
    quiet about it, and keep running.
    """
    clock = Clock()
    events = []
    calls = []

    def refused():
        calls.append(clock.seconds())
        raise Unavailable("the Redis store cannot serve now (READONLY)")

    globalLogPublisher.addObserver(events.append)
    try:
        tasks = Tasks(Logger(), clock, "lease renewal")
        timer = periodic(1.0, refused, clock, tasks)
        timer.startService()
        clock.pump([1.0] * 120)
        timer.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(calls) == 121
    assert [e for e in events if e.get("what") == "lease renewal"] == []
