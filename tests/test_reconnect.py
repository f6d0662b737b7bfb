"""
Stream health and reconnection: a silent engine makes its stream unhealthy
and, later, reconnected; a playback connection that ends is reconnected at
once, on the same engine first and then on another (failover), backing off
between attempts up to C{max_reconnects}; players keep their connections
and their bytes stay whole packets, with one jump in sequence per
reconnection.  Engines that fail their probe get no new stream.

The timer logic runs on a L{Clock} with the fake engine API (and what the
streams view shows of it, on both stores); the engine faults (reset, stall,
lost sync, failed getstream, failed probe) through real sockets with the
simulated engine, on both stores, awaiting what the proxy offers (a
player's bytes, a stream's stop, its background work) rather than polling
its state.
"""

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from acestream_proxy.config import Config, Tuning
from acestream_proxy.engine.registry import Engine
from acestream_proxy.errors import EngineError
from acestream_proxy.http import views
from acestream_proxy.service import make_store
from acestream_proxy.stream.health import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    Verdict,
    check_interval,
    judge_silence,
    reconnect_delays,
)
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing.engine import DESYNC_JUNK, SimulatedEngine
from acestream_proxy.testing.synthetic import verify

from .fakes import FakeEngineAPI, FakeRequest, make_server, packets
from .support import (
    HASHES,
    Player,
    StreamStops,
    check_whole_packets,
    eventually,
    sent_by,
    start_engine,
    watched,
    work_done,
)

KEY = "ab" * 20


# --- the rules ----------------------------------------------------------------


@pytest.mark.parametrize(
    "silent, verdict",
    [
        (0, Verdict.HEALTHY),
        (9.999, Verdict.HEALTHY),
        (10, Verdict.UNHEALTHY),
        (39.999, Verdict.UNHEALTHY),
        (40, Verdict.RECONNECT),
        (3600, Verdict.RECONNECT),
    ],
)
def test_judge_silence(silent, verdict):
    assert judge_silence(silent, Tuning(no_data_timeout=10, reconnect_after=30)) is verdict


def test_silence_is_checked_often_enough():
    assert check_interval(Tuning(no_data_timeout=10)) == 1.0
    assert check_interval(Tuning(no_data_timeout=0.3)) == pytest.approx(0.075)


def test_backoff_doubles_up_to_the_cap():
    """
    The first attempt at once, then base, 2 base, 4 base... capped, each
    with up to half a base of jitter added.
    """
    low = reconnect_delays(lambda: 0.0)
    assert [low(n) for n in range(9)] == [0, 0.5, 1, 2, 4, 8, 15, 15, 15]
    high = reconnect_delays(lambda: 0.999)
    for n in range(1, 12):
        full = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (n - 1))
        assert full == low(n) < high(n) < full + BACKOFF_BASE / 2
    assert reconnect_delays(lambda: 0.5)(3) == 2 + BACKOFF_BASE / 4


# --- timers, on a Clock with the fake engine API --------------------------------


def two_engines() -> list[Engine]:
    return [
        Engine("engine-a", "http://127.0.0.1:6878", "127.0.0.1", 6878),
        Engine("engine-b", "http://127.0.0.1:6879", "127.0.0.1", 6879),
    ]


@attrs.define(eq=False)
class FlakyEngineAPI(FakeEngineAPI):
    """
    A fake engine API whose getstream fails on the engines in C{failing},
    or hangs (as a hung engine does) while C{hang} is set.  C{asked}
    records every getstream, failed or not, with the time it was made.
    """

    clock: object = None
    failing: set = attrs.field(factory=set)
    hang: bool = False
    asked: list = attrs.field(factory=list)

    async def getstream(self, engine, key, param="infohash"):
        self.asked.append((engine.id, self.clock.seconds()))
        if self.hang:
            try:
                await Deferred()
            except CancelledError:
                # What EngineAPI makes of a cancelled request (see
                # tests/test_engine_api.py): a failure of its own, not the
                # cancellation.
                raise EngineError(f"engine {engine.id} failed getstream: ResponseNeverReceived")
        if engine.id in self.failing:
            raise EngineError(f"engine {engine.id} answered getstream with HTTP 500")
        return await super().getstream(engine, key, param)

    @property
    def asked_engines(self) -> list[str]:
        return [engine_id for engine_id, _ in self.asked]


def attach(server, request=None):
    request = request or FakeRequest()
    d = Deferred.fromCoroutine(server.attach(KEY, "id", request))
    return request, d


def started(clock, api=None, engines=None, **tuning):
    """
    A running proxy with one player on KEY, its engine body fed once (at
    time 0, sequence 0..49), and its session's jitter made predictable.
    """
    api = api or FlakyEngineAPI(clock=clock)
    server = make_server(clock, api, engines, **tuning)
    server.startService()
    request, attached = attach(server)
    api.readers[0].dataReceived(packets(0, 50))
    assert attached.called
    session = server.streams[KEY]
    session.source.jitter = lambda: 0.0
    return server, api, request, attached, session


def meta(server) -> dict:
    return server.store.get_stream(KEY).result


def state(server) -> tuple[str, str]:
    m = meta(server)
    return m["status"], m["health"]


def when_stopping(server, session) -> list[dict]:
    """
    The stream's metadata in the store as the session begins to stop:
    once it has stopped, its keys are gone.
    """
    seen = []
    remove = server.removeService

    def spy(stopping):
        seen.append(server.store.get_stream(stopping.key).result)
        return remove(stopping)

    server.removeService = spy
    return seen


def ended_cleanly(attached) -> bool:
    """
    Whether the player's response was told to end as a stream ends: its
    C{done} fired with L{None}, not a failure.
    """
    done = attached.result
    return done.called and done.result is None


def body(request) -> bytes:
    """
    The packets a fake player got, out of their HTTP/1.1 chunk framing.
    """
    raw, out, pos = request.transport.value(), [], 0
    while pos < len(raw):
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol], 16)
        out.append(raw[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(out)


def test_silence_makes_the_stream_unhealthy_then_reconnects_it():
    clock = Clock()
    server, api, request, _, session = started(clock, no_data_timeout=10, reconnect_after=30)
    assert check_interval(server.tuning) == 1.0
    clock.pump([1] * 9)
    assert state(server) == ("started", "healthy")
    clock.advance(1)  # 10 s of silence
    assert state(server) == ("unhealthy", "unhealthy")
    assert session.health == "unhealthy"

    # Data again: healthy at once, and the silence is counted afresh.
    clock.advance(2)
    api.readers[0].dataReceived(packets(50, 10))
    assert state(server) == ("started", "healthy")
    clock.pump([1] * 9)
    assert state(server) == ("started", "healthy")
    clock.advance(1)
    assert state(server) == ("unhealthy", "unhealthy")
    clock.pump([1] * 29)  # 39 s of silence
    assert api.getstreams == [("engine-a", "id", KEY)]
    assert api.stops == []

    clock.advance(1)  # 40 s: reconnect, on the same engine
    assert [e for e, _, _ in api.getstreams] == ["engine-a", "engine-a"]
    assert api.stops == ["session-1"]
    assert state(server) == ("reconnecting", "reconnecting")
    assert meta(server)["reconnects"] == 1
    assert server.store.list_streams().result != []

    api.readers[1].dataReceived(packets(500, 20))
    assert state(server) == ("started", "healthy")
    assert meta(server)["playback_session_id"] == "session-2"
    # The player kept its connection; one jump, at the reconnection.
    assert not request.transport.disconnecting
    assert len(session.players) == 1
    report = verify(body(request), allowed_jumps=1)
    assert report.ok and report.gaps == [(60, 500)], report.describe()


@pytest.mark.parametrize("reason", [ConnectionDone(), ResponseDone()], ids=["reset", "end"])
def test_ended_playback_is_reconnected_at_once(reason):
    """
    A playback connection that fails, or a body the engine ends, is
    replaced without waiting for any timer, on the same engine.
    """
    clock = Clock()
    server, api, request, _, session = started(clock)
    api.readers[0].connectionLost(Failure(reason))
    assert api.asked == [("engine-a", 0), ("engine-a", 0)]
    assert api.stops == ["session-1"]
    assert state(server) == ("reconnecting", "reconnecting")
    api.readers[1].dataReceived(packets(100, 10))
    assert state(server) == ("started", "healthy")
    assert meta(server)["reconnects"] == 1
    assert verify(body(request), allowed_jumps=1).ok
    assert not request.transport.disconnecting
    assert clock.seconds() == 0


def test_reconnection_fails_over_to_the_next_engine():
    clock = Clock()
    server, api, request, _, session = started(clock, engines=two_engines())
    assert meta(server)["container_id"] == "engine-a"
    api.failing.add("engine-a")
    api.readers[0].connectionLost(Failure(ConnectionDone()))
    # Same engine first, then (after the first back-off) the other one.
    assert api.asked_engines == ["engine-a", "engine-a"]
    clock.advance(0.49)
    assert api.asked_engines == ["engine-a", "engine-a"]
    clock.advance(0.01)
    assert api.asked == [("engine-a", 0), ("engine-a", 0), ("engine-b", 0.5)]
    api.readers[1].dataReceived(packets(100, 10))
    m = meta(server)
    assert (m["status"], m["health"], m["container_id"]) == ("started", "healthy", "engine-b")
    assert m["reconnects"] == 2
    assert session.engine.id == "engine-b"
    assert verify(body(request), allowed_jumps=1).ok


def test_reconnection_skips_an_engine_that_failed_its_probe():
    clock = Clock()
    engines = two_engines()
    server, api, request, _, session = started(clock, engines=engines)
    engines[0].healthy = False
    api.readers[0].connectionLost(Failure(ConnectionDone()))
    assert api.asked_engines == ["engine-a", "engine-b"]


def test_backoff_between_attempts_then_error_and_a_clean_end():
    """
    Every attempt fails: they are made after 0, base, 2 base... (the
    jitter drawing 0 adds nothing), capped; after C{max_reconnects} the
    stream goes to C{error} and stops, and its player's body ends cleanly.
    """
    clock = Clock()
    server, api, request, attached, session = started(clock, max_reconnects=8)
    last = when_stopping(server, session)
    producer = next(iter(session.players))
    clock.advance(1)
    api.failing.add("engine-a")
    api.readers[0].connectionLost(Failure(ConnectionDone()))
    clock.pump([0.25] * 200)
    times = [when for _, when in api.asked[1:]]
    assert times == [1, 1.5, 2.5, 4.5, 8.5, 16.5, 31.5, 46.5]

    [m] = last
    assert (m["status"], m["health"], m["reconnects"]) == ("error", "error", 8)
    assert server.streams == {}
    assert server.store.list_streams().result == []
    assert producer.finished and ended_cleanly(attached)
    assert api.stops == ["session-1"]
    assert clock.getDelayedCalls() != []  # the server's own loops go on
    server.stopService()


def test_failed_attempts_sessions_are_stopped():
    """
    An attempt whose engine opens a session but sends nothing in time
    fails; its session is stopped, as the replaced one was.
    """
    clock = Clock()
    server, api, request, attached, session = started(
        clock, engines=two_engines(), max_reconnects=2, first_byte_timeout=5
    )
    last = when_stopping(server, session)
    api.readers[0].connectionLost(Failure(ConnectionDone()))
    assert api.stops == ["session-1"]
    clock.advance(5)
    assert api.stops == ["session-1", "session-2"]
    clock.advance(0.5)
    assert api.asked_engines == ["engine-a", "engine-a", "engine-b"]
    # The next body ends before any data: that attempt fails at once.
    api.readers[2].connectionLost(Failure(ConnectionDone()))
    assert api.stops == ["session-1", "session-2", "session-3"]
    assert [(m["status"], m["reconnects"]) for m in last] == [("error", 2)]
    assert server.streams == {}
    assert server.store.list_streams().result == []
    assert ended_cleanly(attached)
    assert [engine for engine, _, _ in api.getstreams] == ["engine-a", "engine-a", "engine-b"]


def test_stopping_during_a_reconnection_ends_it():
    """
    A stream stopped while a reconnection waits for the engine: the
    attempt is given up and nothing of the stream comes back.
    """
    clock = Clock()
    server, api, request, attached, session = started(clock)
    api.hang = True
    api.readers[0].connectionLost(Failure(ConnectionDone()))
    assert len(api.asked) == 2
    Deferred.fromCoroutine(server.stop_stream(KEY, "test"))
    assert server.streams == {}
    assert server.store.list_streams().result == []
    api.hang = False
    clock.pump([0.25] * 100)
    assert len(api.asked) == 2
    assert server.store.list_streams().result == []
    assert api.readers[1:] == []
    assert ended_cleanly(attached)


def test_no_reconnection_allowed_ends_the_stream_at_once():
    clock = Clock()
    server, api, request, attached, session = started(clock, max_reconnects=0)
    last = when_stopping(server, session)
    api.readers[0].connectionLost(Failure(ConnectionDone()))
    assert [(m["status"], m["reconnects"]) for m in last] == [("error", 0)]
    assert api.asked_engines == ["engine-a"]
    assert api.stops == ["session-1"]
    assert server.streams == {}
    assert server.store.list_streams().result == []
    assert ended_cleanly(attached)


# --- what the streams view shows, on either store -------------------------------


async def clocked_server(store_url, clock, api, **tuning):
    """
    A running proxy on C{clock} with the fake engine API, on the embedded
    store or on the Redis at C{store_url}, whose own I/O runs on the real
    reactor (the test awaits it, never polls).
    """
    store = None
    if store_url is not None:
        store = make_store(Config(redis=store_url, tuning=Tuning(**tuning)), reactor, "worker-1")
        store.startService()
        # Both of its connection pools, up.
        await store.get_owner(KEY)
        await store.buffer.latest(KEY)
    server = make_server(clock, api, store=store, **tuning)
    server.startService()
    return server


async def shown(server, session) -> tuple:
    """
    The stream's status, health and reconnections as C{GET /streams}
    shows them, once the metadata writes under way have landed.
    """
    await work_done(session)
    [stream] = await views.streams_view(server)
    return stream["status"], stream["health"], stream["reconnects"]


@pytest_twisted.ensureDeferred
async def test_the_streams_view_shows_a_silent_engine(store_url, log_events):
    """
    What the API shows of a stream whose engine falls silent, on either
    store: unhealthy and not yet reconnected from C{no_data_timeout} on,
    then reconnected once C{reconnect_after} more have passed and the new
    session's data flows.
    """
    clock = Clock()
    api = FlakyEngineAPI(clock=clock)
    # A lease long enough that no renewal falls in the test.
    server = await clocked_server(
        store_url, clock, api, no_data_timeout=10, reconnect_after=30, owner_lease=300
    )
    request = FakeRequest()
    attached = Deferred.fromCoroutine(server.attach(KEY, "id", request))
    (await api.reader(0)).dataReceived(packets(0, 50))
    await attached
    session = server.streams[KEY]
    session.source.jitter = lambda: 0.0

    clock.pump([1] * 9)
    assert await shown(server, session) == ("started", "healthy", 0)
    assert not logged(log_events, "is unhealthy")
    clock.advance(1)
    assert await shown(server, session) == ("unhealthy", "unhealthy", 0)
    assert logged(log_events, "is unhealthy")
    clock.pump([1] * 29)
    assert await shown(server, session) == ("unhealthy", "unhealthy", 0)
    assert not logged(log_events, "reconnecting")
    assert api.asked_engines == ["engine-a"]

    clock.advance(1)
    assert logged(log_events, "reconnecting")
    assert api.asked_engines == ["engine-a", "engine-a"]
    api.readers[1].dataReceived(packets(500, 20))
    assert await shown(server, session) == ("started", "healthy", 1)
    assert api.stops == ["session-1"]
    report = verify(body(request), allowed_jumps=1)
    assert report.ok and report.gaps == [(50, 500)], report.describe()

    await session.stop("the test is over")
    await server.stopService()
    if store_url is not None:
        await server.store.stopService()


# --- engine faults through real sockets -----------------------------------------

#: Small numbers, so that a test's stream ends soon after its players leave.
FAST = dict(cleanup_grace=0.2, heartbeat_interval=0.2)


@pytest.fixture
def log_events():
    """
    Every log event emitted during the test.
    """
    events = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def logged(events, fragment: str) -> list[dict]:
    return [e for e in events if fragment in (e.get("log_format") or "")]


async def get_json(url: str):
    return await treq.json_content(await treq.get(url))


async def stream_info(proxy, key: str = HASHES[0]) -> dict | None:
    for stream in await get_json(proxy.url + "/streams"):
        if stream["key"] == key:
            return stream
    return None


def check_bytes(player: Player, allowed_jumps: int, key: str = HASHES[0]):
    return check_whole_packets(player.data, key, allowed_jumps)


async def nothing_left(proxy, *engines) -> None:
    """
    Once its players are gone, the stream stops (after its grace) and
    leaves no session on the proxy, no key in the store and no session on
    any engine: its stop waited for the engines' answers to every stop
    command, those of the sessions it replaced included.
    """
    await StreamStops.of(proxy.registry).all_stopped()
    assert proxy.registry.streams == {}
    assert await proxy.registry.store.list_streams() == []
    for running in engines:
        assert running.engine.sessions == {}
        assert running.engine.playback_connections == 0


@pytest_twisted.ensureDeferred
async def test_engine_reset_is_reconnected_and_players_stay(
    engine, proxy_factory, store_url, log_events
):
    proxy = await watched(proxy_factory, [engine.config("engine-a")], redis=store_url, **FAST)
    player = await Player.open(proxy.stream_url(HASHES[0]))
    await player.wait_bytes(100 * PACKET_SIZE)
    session = proxy.registry.streams[HASHES[0]]
    [first_session] = engine.engine.sessions
    sent = sent_by(engine)
    assert engine.engine.drop_playback() == 1

    # Bytes past what the first session sent come from a second one.
    await player.wait_bytes(sent + 500 * PACKET_SIZE)
    assert len(engine.engine.getstream_calls) == 2
    await work_done(session)
    assert first_session in engine.engine.stopped
    stream = await stream_info(proxy)
    assert stream["health"] == "healthy"
    assert stream["reconnects"] == 1
    assert stream["status"] == "started"
    assert stream["playback_session_id"] != first_session
    assert len(check_bytes(player, allowed_jumps=1).gaps) == 1
    assert player.clean_end is None, "the player kept its connection"
    assert logged(log_events, "ended playback")
    assert logged(log_events, "reconnected on")

    player.disconnect()
    await nothing_left(proxy, engine)


@pytest.fixture
def stall_until_reconnected(monkeypatch):
    """
    A C{playback_stall} that lasts until the proxy asks the engine for a
    new session, so that the reconnection it makes is what ends it.
    """
    open_session = SimulatedEngine.open_session

    def lifting(self, *args, **kwargs):
        self.faults.discard("playback_stall")
        return open_session(self, *args, **kwargs)

    monkeypatch.setattr(SimulatedEngine, "open_session", lifting)


@pytest_twisted.ensureDeferred
async def test_stalled_engine_turns_unhealthy_then_is_reconnected(
    engine, proxy_factory, store_url, log_events, stall_until_reconnected
):
    """
    An engine connection that carries nothing is replaced.  When each step
    is taken, and what the stream shows meanwhile, is for the Clock tests
    above; here the whole path, through sockets, on either store.
    """
    proxy = await watched(
        proxy_factory,
        [engine.config("engine-a")],
        redis=store_url,
        no_data_timeout=0.3,
        reconnect_after=0.6,
        **FAST,
    )
    player = await Player.open(proxy.stream_url(HASHES[0]))
    await player.wait_bytes(100 * PACKET_SIZE)
    session = proxy.registry.streams[HASHES[0]]
    engine.engine.faults.add("playback_stall")
    sent = sent_by(engine)

    # Bytes past what the stalled session sent come from a new one.
    await player.wait_bytes(sent + 500 * PACKET_SIZE)
    assert len(engine.engine.getstream_calls) == 2
    assert logged(log_events, "is unhealthy")
    assert logged(log_events, "reconnecting")
    await work_done(session)
    stream = await stream_info(proxy)
    assert (stream["status"], stream["health"], stream["reconnects"]) == ("started", "healthy", 1)
    assert len(check_bytes(player, allowed_jumps=1).gaps) == 1

    player.disconnect()
    await nothing_left(proxy, engine)


@pytest_twisted.ensureDeferred
async def test_failover_to_the_next_engine(proxy_factory, store_url, log_events):
    first = start_engine(bitrate=8_000_000)
    second = start_engine(bitrate=8_000_000)
    try:
        proxy = await watched(
            proxy_factory,
            [first.config("engine-a"), second.config("engine-b")],
            redis=store_url,
            **FAST,
        )
        player = await Player.open(proxy.stream_url(HASHES[0]))
        await player.wait_bytes(100 * PACKET_SIZE)
        session = proxy.registry.streams[HASHES[0]]
        [first_session] = first.engine.sessions
        first.engine.faults.add("getstream_500")
        sent = sent_by(first)
        first.engine.drop_playback()

        # Bytes past what the first session sent come from the second
        # engine: the first opens no other session.
        await player.wait_bytes(sent + 500 * PACKET_SIZE)
        assert len(second.engine.sessions) == 1
        await work_done(session)
        stream = await stream_info(proxy)
        assert (stream["health"], stream["container_id"]) == ("healthy", "engine-b")
        # One attempt on the same engine, one on the next.
        assert stream["reconnects"] == 2
        assert len(first.engine.getstream_calls) == 2
        assert len(second.engine.getstream_calls) == 1
        assert first_session in first.engine.stopped
        assert len(check_bytes(player, allowed_jumps=1).gaps) == 1
        assert logged(log_events, "reconnection {n} failed")

        player.disconnect()
        await nothing_left(proxy, first, second)
    finally:
        await first.stop()
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_reconnections_exhausted_end_the_players_cleanly(
    proxy_factory, store_url, log_events
):
    first = start_engine(bitrate=8_000_000)
    second = start_engine(bitrate=8_000_000)
    try:
        proxy = await watched(
            proxy_factory,
            [first.config("engine-a"), second.config("engine-b")],
            redis=store_url,
            max_reconnects=3,
            **FAST,
        )
        players = [await Player.open(proxy.stream_url(HASHES[0])) for _ in range(2)]
        for player in players:
            await player.wait_bytes(100 * PACKET_SIZE)
        proxy.registry.streams[HASHES[0]].source.jitter = lambda: 0.0
        for running in (first, second):
            running.engine.faults.add("getstream_500")
        first.engine.drop_playback()

        for player in players:
            assert await player.ended is True, "the body must end with the chunked terminator"
            check_bytes(player, allowed_jumps=0)
        assert len(first.engine.getstream_calls) + len(second.engine.getstream_calls) == 4
        assert len(second.engine.getstream_calls) >= 1
        assert logged(log_events, "giving up after")
        await nothing_left(proxy, first, second)
    finally:
        await first.stop()
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_lost_sync_is_regained_without_losing_a_packet(
    engine, proxy_factory, store_url, log_events
):
    """
    Junk before each batch of the engine's body: the aligner drops exactly
    the junk, so the players' bytes stay whole packets with no packet lost.
    """
    proxy = await watched(proxy_factory, [engine.config("engine-a")], redis=store_url, **FAST)
    player = await Player.open(proxy.stream_url(HASHES[0]))
    await player.wait_bytes(100 * PACKET_SIZE)
    engine.engine.faults.add("playback_desync")
    session = proxy.registry.streams[HASHES[0]]
    aligner = session.source._reader.aligner
    await eventually(lambda: aligner.resyncs >= 5, what="five losses of sync")
    await player.more(200 * PACKET_SIZE)
    engine.engine.faults.discard("playback_desync")
    await player.more(200 * PACKET_SIZE)

    assert aligner.discarded == aligner.resyncs * len(DESYNC_JUNK)
    assert check_bytes(player, allowed_jumps=0).gaps == []
    assert len(engine.engine.getstream_calls) == 1
    assert (await stream_info(proxy))["reconnects"] == 0
    assert logged(log_events, "lost packet sync")

    player.disconnect()
    await nothing_left(proxy, engine)


@pytest_twisted.ensureDeferred
async def test_engine_failing_its_probe_gets_no_new_stream(proxy_factory, store_url, log_events):
    first = start_engine(bitrate=1_000_000)
    second = start_engine(bitrate=1_000_000)
    try:
        proxy = await watched(
            proxy_factory,
            [first.config("engine-a"), second.config("engine-b")],
            redis=store_url,
            **FAST,
        )
        engines_url = proxy.url + "/engines"
        # The probes are made here rather than waited for: their period is
        # tested on a Clock (tests/test_timers.py).
        probe = proxy.registry.engines.probe
        await work_done(proxy.registry)
        first.engine.faults.add("version_fail")
        await probe()
        engines = await get_json(engines_url)
        assert [e["healthy"] for e in engines] == [False, True]
        assert logged(log_events, "failed its health probe")
        player = await Player.open(proxy.stream_url(HASHES[0]))
        await player.wait_bytes(10 * PACKET_SIZE)
        assert first.engine.getstream_calls == []
        assert len(second.engine.getstream_calls) == 1

        first.engine.faults.discard("version_fail")
        await probe()
        engines = await get_json(engines_url)
        assert [e["healthy"] for e in engines] == [True, True]
        assert logged(log_events, "is healthy again")
        # Back in the rotation: the least loaded engine takes the next stream.
        other = await Player.open(proxy.stream_url(HASHES[1]))
        await other.wait_bytes(10 * PACKET_SIZE)
        assert len(first.engine.getstream_calls) == 1
        engines = await get_json(engines_url)
        assert {e["id"]: e["streams"] for e in engines} == {"engine-a": 1, "engine-b": 1}

        player.disconnect()
        other.disconnect()
        await nothing_left(proxy, first, second)
    finally:
        await first.stop()
        await second.stop()
