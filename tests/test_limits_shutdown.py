"""
Limits, stuck players, graceful shutdown and admin actions, on real sockets
of 127.0.0.1 (and, for SIGTERM, a C{twistd -n aceproxy} process on a real
Redis).

Past C{max_clients}, C{max_clients_per_stream} or C{max_streams} a player
gets C{503} JSON with C{Retry-After} while the players already there stream
on.  A player that stops reading costs the daemon at most about one chunk of
memory, and is dropped after C{write_timeout}.  A shutdown refuses new
requests while it ends every player's body cleanly, stops the engine
sessions and deletes the streams' keys, within 10 s even when the engine
hangs.  Admin actions need the token, or loopback without one, and the token
never reaches the logs.

Every wait is for an event or a condition with a deadline, never a fixed
sleep.
"""

from __future__ import annotations

import gc
import inspect
import signal
import socket
import weakref

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from acestream_proxy.config import Config, Tuning
from acestream_proxy.errors import Forbidden, Unauthorized
from acestream_proxy.http.routes import ProxyWeb
from acestream_proxy.service import make_service
from acestream_proxy.store import keys as redis_keys
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.registry import LIMIT_RETRY_AFTER, SHUTDOWN_DRAIN, SHUTDOWN_RETRY_AFTER

from .rawplayer import open_raw_player
from .redis_server import free_port
from .support import HASHES, Player, check_whole_packets, eventually, gone, start_proxy
from .test_end_to_end import PROXY_LISTENING, spawn, twistd  # noqa: F401 (spawn: fixture)

KEY, OTHER, THIRD = HASHES[3], HASHES[4], HASHES[5]

#: Every Redis key of every stream.
STREAM_KEYS = f"{redis_keys.PREFIX}:stream:*"

#: The largest chunk, framed: a chunk is sealed once it holds chunk_bytes, so
#: it holds less than that before its last read from the engine; a read is at
#: most 64 KiB (Twisted's read size), to which the packet aligner may add the
#: part of a packet left from the read before; then the size line and CRLF.
MAX_CHUNK = Tuning().chunk_bytes + 2**16 + PACKET_SIZE + 16

#: What a stuck player may hold in our memory besides the rest of one chunk:
#: the transport's C{bufferSize}, and the end of the HTTP response.
PER_PLAYER_SLACK = 1024

#: The admin token the proxies are given, and a wrong guess at it.
TOKEN = "admin-7c1e52f09b3d4a66"
WRONG = "guess-5e2b9d0c41f8a7e3"

#: Players that stop reading, in the stuck-player tests: enough to show the
#: bound, few enough to be quick.
STUCK = 200


# --- helpers -----------------------------------------------------------------


def check(data: bytes | bytearray, key: str = KEY, allowed_jumps: int = 0):
    return check_whole_packets(data, key, allowed_jumps)


async def refused(url: str, retry_after: int = LIMIT_RETRY_AFTER) -> str:
    """
    Ask C{url}; it must be answered C{503} JSON with C{Retry-After}.  The
    error message it gave.
    """
    response = await treq.get(url, persistent=False).addTimeout(10, reactor)
    body = await treq.json_content(response)
    assert response.code == 503, (response.code, body)
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert response.headers.getRawHeaders(b"retry-after") == [b"%d" % retry_after]
    return body["error"]


async def streaming(*players: Player, key: str = KEY) -> None:
    """
    Each player gets a good deal more of the broadcast, whole and in order.
    """
    for player in players:
        await player.more(200 * PACKET_SIZE)
        check(player.data, key)


async def until(ask, good, timeout: float = 10.0, what: str = ""):
    """
    L{eventually} for a condition that takes a call to find out: call
    C{ask()} (a L{Deferred}) until C{good} holds for what it fires with.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = await ask()
        if good(value):
            return value
        assert reactor.seconds() < deadline, f"timed out after {timeout}s waiting for {what}: {value}"
        await deferLater(reactor, 0.02, lambda: None)


def queued(transport) -> int:
    """
    Bytes a connection holds in this process's memory, waiting for the
    kernel to take them.  This reads Twisted's private counters
    (C{abstract.FileDescriptor}'s C{dataBuffer}, C{offset} and
    C{_tempDataLen}): a measurement for this test only, which no public API
    offers.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def raw_producers(session) -> list:
    """The producers of the session's raw-socket players (user agent C{raw})."""
    return [p for p in session.players if p.info.user_agent == "raw"]


async def chunks_later(session, count: int) -> None:
    """
    Fire once C{count} more chunks have reached the session's players.
    """
    for _ in range(count):
        await session.fanout.next_chunk().addTimeout(10, reactor)


def all_gone(producers, timeout: float = 20.0) -> Deferred:
    """
    Fire once the proxy has seen the connection of each of C{producers}
    close (see L{gone}).
    """
    return DeferredList(
        [gone(producer, timeout) for producer in producers],
        fireOnOneErrback=True,
        consumeErrors=True,
    )


def stream_keys(redis_server) -> list[str]:
    client = redis_server.client()
    try:
        return client.keys(STREAM_KEYS)
    finally:
        client.close()


@attrs.define
class Daemon:
    """
    A proxy built as C{twistd} builds it, its own listener included, so
    that a shutdown closes that listener in its turn, after the streams.
    """

    service: object
    url: str
    port: int

    @property
    def registry(self):
        return self.service.getServiceNamed("streams")

    def stream_url(self, key: str) -> str:
        return f"{self.url}/ace/getstream?id={key}"


@pytest.fixture
def daemons():
    """
    Start in-process proxies with their own listener; each is stopped at
    teardown unless the test stopped it.
    """
    started = []

    async def start(engines, redis=None, **tuning) -> Daemon:
        port = free_port()
        config = Config(
            listen=f"tcp:{port}:interface=127.0.0.1",
            redis=redis,
            engines=tuple(engines),
            tuning=Tuning(**tuning),
        )
        service = make_service(config, reactor)
        service.startService()
        started.append(service)
        await service.getServiceNamed("streams").engines.probe()
        return Daemon(service, f"http://127.0.0.1:{port}", port)

    yield start
    for service in started:
        if service.running:
            pytest_twisted.blockon(service.stopService())


# --- limits ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_clients_refuses_the_next_player(engine, proxy_factory, store_url):
    """
    With C{max_clients=2}, a third player gets 503 JSON with Retry-After,
    whether it asks for a stream that plays or a new one (which is then not
    started); the first two stream on.
    """
    proxy = await proxy_factory([engine.config("engine-a")], redis=store_url, max_clients=2)
    first = await Player.open(proxy.stream_url(KEY))
    second = await Player.open(proxy.stream_url(OTHER))
    assert (first.response.code, second.response.code) == (200, 200)
    await first.wait_bytes(100 * PACKET_SIZE)
    await second.wait_bytes(100 * PACKET_SIZE)

    assert "too many players" in await refused(proxy.stream_url(KEY))
    assert "too many players" in await refused(proxy.stream_url(THIRD))

    assert engine.engine.getstream_calls == [("id", KEY), ("id", OTHER)]
    await streaming(first)
    await streaming(second, key=OTHER)


@pytest_twisted.ensureDeferred
async def test_max_clients_per_stream_refuses_only_that_stream(engine, proxy_factory, store_url):
    """
    With C{max_clients_per_stream=1}, a second player of a stream gets 503;
    a player of another stream is served; the first streams on.
    """
    proxy = await proxy_factory(
        [engine.config("engine-a")], redis=store_url, max_clients_per_stream=1
    )
    first = await Player.open(proxy.stream_url(KEY))
    assert first.response.code == 200
    await first.wait_bytes(100 * PACKET_SIZE)

    assert "too many players on this stream" in await refused(proxy.stream_url(KEY))
    other = await Player.open(proxy.stream_url(OTHER))
    assert other.response.code == 200

    await streaming(first)
    await streaming(other, key=OTHER)
    assert len(proxy.registry.streams[KEY].players) == 1


@pytest_twisted.ensureDeferred
async def test_max_streams_refuses_a_new_stream_not_a_new_player(engine, proxy_factory, store_url):
    """
    With C{max_streams=1}, a second stream gets 503 and no engine session;
    another player of the first stream joins it.
    """
    proxy = await proxy_factory([engine.config("engine-a")], redis=store_url, max_streams=1)
    first = await Player.open(proxy.stream_url(KEY))
    assert first.response.code == 200
    await first.wait_bytes(100 * PACKET_SIZE)

    assert "too many streams" in await refused(proxy.stream_url(OTHER))
    second = await Player.open(proxy.stream_url(KEY))
    assert second.response.code == 200

    await streaming(first, second)
    assert engine.engine.getstream_calls == [("id", KEY)]


@pytest.mark.parametrize(
    "limit", ["max_clients", "max_clients_per_stream"], ids=["max_clients", "per_stream"]
)
@pytest_twisted.ensureDeferred
async def test_simultaneous_players_of_a_starting_stream_respect_the_limit(
    engine, proxy_factory, store_url, limit
):
    """
    Three players ask at once for a stream that is not playing yet: they
    all wait for it to start, and then only two of them may join.
    """
    proxy = await proxy_factory([engine.config("engine-a")], redis=store_url, **{limit: 2})
    results = await DeferredList(
        [Deferred.fromCoroutine(Player.open(proxy.stream_url(KEY))) for _ in range(3)],
        fireOnOneErrback=True,
    )
    players = [player for _, player in results]
    assert sorted(p.response.code for p in players) == [200, 200, 503]
    (late,) = [p for p in players if p.response.code == 503]
    assert late.response.headers.getRawHeaders(b"retry-after") == [b"%d" % LIMIT_RETRY_AFTER]
    assert len(proxy.registry.streams[KEY].players) == 2
    await streaming(*[p for p in players if p.response.code == 200])


@pytest_twisted.ensureDeferred
async def test_simultaneous_new_streams_respect_max_streams(engine, proxy_factory, store_url):
    """
    Players of two streams that are not playing ask at once, with
    C{max_streams=1}: one stream starts, the other is refused without an
    engine session.
    """
    proxy = await proxy_factory([engine.config("engine-a")], redis=store_url, max_streams=1)
    results = await DeferredList(
        [Deferred.fromCoroutine(Player.open(proxy.stream_url(key))) for key in (KEY, OTHER)],
        fireOnOneErrback=True,
    )
    players = dict(zip((KEY, OTHER), (player for _, player in results)))
    codes = {key: player.response.code for key, player in players.items()}
    assert sorted(codes.values()) == [200, 503], codes
    (started,) = [key for key, code in codes.items() if code == 200]
    (refused_key,) = [key for key, code in codes.items() if code == 503]
    assert "too many streams" in (await players[refused_key].json())["error"]
    assert engine.engine.getstream_calls == [("id", started)]
    await streaming(players[started], key=started)


@pytest_twisted.ensureDeferred
async def test_max_clients_per_stream_counts_players_of_every_worker(engine, redis_server, proxy_factory):
    """
    Two workers on one Redis, C{max_clients_per_stream=2}: a player on
    each, then a third is refused on either worker.
    """
    workers = [
        await proxy_factory(
            [engine.config("engine-a")], redis=redis_server.url, max_clients_per_stream=2
        )
        for _ in range(2)
    ]
    players = []
    for worker in workers:
        players.append(await Player.open(worker.stream_url(KEY)))
        await players[-1].wait_bytes(100 * PACKET_SIZE)
    assert [p.response.code for p in players] == [200, 200]

    store = workers[0].registry.store
    await until(lambda: store.list_players(KEY), lambda c: len(c) == 2, what="both players in Redis")
    for worker in workers:
        assert "too many players on this stream" in await refused(worker.stream_url(KEY))
    await streaming(*players)
    assert engine.engine.getstream_calls == [("id", KEY)]


@pytest_twisted.ensureDeferred
async def test_max_streams_lets_another_worker_join_a_playing_stream(
    engine, redis_server, proxy_factory
):
    """
    Two workers on one Redis, C{max_streams=1}: the stream the first one
    plays is no new stream for the second, whose player joins it; a new
    stream is refused on either.
    """
    workers = [
        await proxy_factory([engine.config("engine-a")], redis=redis_server.url, max_streams=1)
        for _ in range(2)
    ]
    first = await Player.open(workers[0].stream_url(KEY))
    assert first.response.code == 200
    await first.wait_bytes(100 * PACKET_SIZE)
    second = await Player.open(workers[1].stream_url(KEY))
    assert second.response.code == 200, await second.json()

    for worker in workers:
        assert "too many streams" in await refused(worker.stream_url(OTHER))
    await streaming(first, second)
    assert engine.engine.getstream_calls == [("id", KEY)]


# --- stuck players -------------------------------------------------------------


#: Raw players connected at once: their connect() blocks until this process
#: accepts, so a batch must fit in the listen backlog (50 with Twisted).
BATCH = 25


async def stuck_players(proxy, count: int, note=lambda: None) -> list:
    """
    C{count} raw players of C{KEY} with tiny receive buffers that stop
    reading as soon as their response has begun, as players whose network
    stalled.  C{note()} is called at each check while they are opened.
    """
    port = proxy.port.getHost().port
    players = []
    while len(players) < count:
        batch = [
            open_raw_player(port, f"/ace/getstream?id={KEY}")
            for _ in range(min(BATCH, count - len(players)))
        ]
        players += batch

        def answered(batch=batch) -> bool:
            note()
            return all(p.head is not None for p in batch)

        await eventually(answered, what="stuck players' response headers")
        for player in batch:
            assert player.head.startswith(b"HTTP/1.1 200"), player.head
            player.pause()
    return players


@pytest_twisted.ensureDeferred
async def test_stuck_players_hold_at_most_one_chunk_each(engine, proxy_factory):
    """
    Many players stop reading: once their sockets are full, the daemon
    holds at most about one chunk for each in its own memory (the rest is in
    their kernel buffers), and that does not grow while the stream runs on.
    A healthy player alongside gets every packet.
    """
    proxy = await proxy_factory(
        [engine.config("engine-a")], write_timeout=60, buffer_chunks=40, join_chunks=2
    )
    healthy = await Player.open(proxy.stream_url(KEY))
    await healthy.wait_bytes(100 * PACKET_SIZE)
    session = proxy.registry.streams[KEY]
    window = session.fanout.window
    stuck = await stuck_players(proxy, STUCK)
    try:
        await eventually(
            lambda: len(raw_producers(session)) == STUCK
            and all(p.paused for p in raw_producers(session)),
            timeout=20,
            what=f"{STUCK} stuck players paused",
        )
        transports = [p.request.transport for p in raw_producers(session)]
        bound = STUCK * (MAX_CHUNK + PER_PLAYER_SLACK)
        samples = []
        for _ in range(3):
            held = [queued(t) for t in transports]
            samples.append(sum(held))
            assert max(held) <= MAX_CHUNK + PER_PLAYER_SLACK, max(held)
            assert sum(held) <= bound, (sum(held), bound)
            # Half a second of broadcast more, every stuck player still there.
            mark = window.next_index
            await chunks_later(session, 10)
            assert window.next_index >= mark + 10
            assert len(raw_producers(session)) == STUCK
        assert samples[-1] <= samples[0], samples
        assert samples[0] > 0, "the stuck players' sockets never filled"

        await healthy.more(300 * PACKET_SIZE)
        check(healthy.data)
    finally:
        left = all_gone(raw_producers(session))
        for player in stuck:
            player.transport.abortConnection()
    await left
    assert not raw_producers(session), "the stuck players are gone"


@pytest_twisted.ensureDeferred
async def test_stuck_players_are_dropped_after_write_timeout(engine, proxy_factory, store_url):
    """
    With a short C{write_timeout}, every player that stopped reading is
    disconnected; nothing of the daemon keeps its producer or connection,
    and the stream (and the store) is left with the healthy player, which
    never missed a packet.
    """
    proxy = await proxy_factory(
        [engine.config("engine-a")], redis=store_url, write_timeout=0.5, join_chunks=2
    )
    healthy = await Player.open(proxy.stream_url(KEY))
    await healthy.wait_bytes(100 * PACKET_SIZE)
    session = proxy.registry.streams[KEY]
    (kept,) = session.players

    # Each stuck producer lives at least write_timeout, longer than between
    # two checks of stuck_players: note them all, and when each goes.
    seen: dict[str, tuple] = {}
    dropped = []

    def note() -> None:
        for producer in raw_producers(session):
            if producer.info.id not in seen:
                seen[producer.info.id] = (
                    weakref.ref(producer),
                    weakref.ref(producer.request.transport),
                )
                dropped.append(gone(producer, timeout=20))

    stuck = await stuck_players(proxy, STUCK, note)
    assert len(seen) == STUCK

    def disconnected(refs) -> bool:
        transport = refs[1]()
        return transport is None or not transport.connected

    # Their sockets fill, write_timeout passes (on a Clock in
    # tests/test_timers.py), and the proxy drops each.
    await DeferredList(dropped, fireOnOneErrback=True, consumeErrors=True)
    assert session.players.producers == {kept}
    assert all(disconnected(refs) for refs in seen.values())
    assert session.fanout.producers == {kept}
    assert session.fanout.live_count == 1
    await until(
        lambda: proxy.registry.store.list_players(KEY),
        lambda clients: list(clients) == [kept.info.id],
        what="only the healthy player in the store",
    )
    # Reading again, they find their connections gone.
    for player in stuck:
        player.resume()
    await eventually(lambda: all(p.closed for p in stuck), what="the stuck players see the end")
    del stuck

    await healthy.more(300 * PACKET_SIZE)
    assert kept.skips == 0
    check(healthy.data)

    # Last, as it stops the reactor (and the in-process engine with it) for
    # as long as the heap takes to walk.
    gc.collect()
    assert not held_by_more_than_log_history(seen.values(), inspect.currentframe())


def held_by_more_than_log_history(refs, frame) -> list:
    """
    What keeps any of the dropped players' producers or connections alive,
    other than events in twisted.logger's history: until logging begins
    (twistd begins it at start-up, these tests never do) it keeps the last
    65,536 events, and the warning that drops a player names its producer as
    the event's source, which holds its request and connection.
    """
    producers = [p() for p, _ in refs if p() is not None]
    own = {id(p.request.transport) for p in producers}
    holders = [
        f"connection {t!r} without its producer"
        for _, t in refs
        if t() is not None and id(t()) not in own
    ]
    for producer in producers:
        for holder in gc.get_referrers(producer):
            if holder is producers or holder is frame:
                continue
            if isinstance(holder, dict) and holder.get("log_source") is producer:
                continue
            if isinstance(holder, Logger) and holder.source is producer:
                continue
            holders.append(f"{type(holder).__name__} holding {producer!r}"[:300])
    return holders


@pytest_twisted.ensureDeferred
async def test_player_that_sends_more_bytes_keeps_streaming(engine, proxy_factory):
    """
    A player that sends something more while it plays (here a pipelined
    request) keeps its stream: the transport's tiny send buffer, which makes
    a stuck player hold little, must not make every read look like the end of
    the connection.
    """
    proxy = await proxy_factory([engine.config("engine-a")])
    player = open_raw_player(
        proxy.port.getHost().port, f"/ace/getstream?id={KEY}", rcvbuf=1 << 20
    )
    await eventually(lambda: len(player.body()) > 100 * PACKET_SIZE, what="the stream")
    player.transport.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got = len(player.body())
    await eventually(
        lambda: player.closed or len(player.body()) > got + 500 * PACKET_SIZE,
        what="more of the stream",
    )
    assert not player.closed, "the player was disconnected"
    check(player.body())
    player.transport.loseConnection()


# --- graceful shutdown -----------------------------------------------------------


async def stuck_player(daemon: Daemon, session):
    """
    A raw player of C{KEY} that has stopped reading, and its producer once
    its socket is full, with bytes queued for it in our memory.
    """
    player = open_raw_player(daemon.port, f"/ace/getstream?id={KEY}")
    await eventually(lambda: player.head is not None, what="the stuck player's headers")
    assert player.head.startswith(b"HTTP/1.1 200"), player.head
    player.pause()
    (producer,) = raw_producers(session)
    await eventually(
        lambda: producer.paused and queued(producer.request.transport) > 0,
        what="the stuck player's socket full",
    )
    return player, producer


@pytest_twisted.ensureDeferred
async def test_shutdown_ends_every_player_cleanly_and_refuses_new_requests(
    engine, daemons, store_url, request
):
    """
    C{stopService}: while it runs, the listener still answers, with 503
    and Retry-After; each player gets what was queued for it and the end of
    its body; the engine session is stopped and, with Redis, the stream's
    keys are deleted; then the listener closes.
    """
    redis_server = request.getfixturevalue("redis_server") if store_url else None
    daemon = await daemons([engine.config("engine-a")], redis=store_url)
    fast = await Player.open(daemon.stream_url(KEY))
    assert fast.response.code == 200
    await fast.wait_bytes(100 * PACKET_SIZE)
    session = daemon.registry.streams[KEY]
    # A player that stopped reading: the shutdown waits for its last bytes
    # (up to SHUTDOWN_DRAIN), which holds it open for the requests below.
    slow, _ = await stuck_player(daemon, session)
    (session_id,) = engine.engine.sessions
    if redis_server is not None:
        assert stream_keys(redis_server), "the stream is not in Redis"

    started = reactor.seconds()
    stopping = daemon.service.stopService()
    stopped = []
    stopping.addBoth(lambda result: stopped.append(reactor.seconds()) or result)
    assert "shutting down" in await refused(daemon.stream_url(OTHER), SHUTDOWN_RETRY_AFTER)
    health = await treq.get(daemon.url + "/health", persistent=False).addTimeout(5, reactor)
    assert health.code == 503
    assert (await treq.json_content(health))["status"] == "stopping"
    assert not stopped, "the shutdown did not wait for the stuck player"
    assert await fast.ended.addTimeout(5, reactor) is True

    slow.resume()
    resumed = reactor.seconds()
    await stopping.addTimeout(10, reactor)
    # It ended as soon as the stuck player had its last bytes, not at the
    # drain's deadline.
    assert stopped[0] - resumed < SHUTDOWN_DRAIN / 2, stopped[0] - resumed
    assert reactor.seconds() - started < 10
    await eventually(lambda: slow.closed, what="the stuck player's connection closed")
    assert slow.raw.endswith(b"\r\n0\r\n\r\n"), slow.raw[-40:]
    check(fast.data)
    check(slow.body())
    assert engine.engine.getstream_calls == [("id", KEY)]
    assert engine.engine.stopped == [session_id]
    assert engine.engine.sessions == {}
    if redis_server is not None:
        assert stream_keys(redis_server) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()


class UnansweredCommands(Resource):
    """
    An engine's HTTP API, except that its command URLs (C{stop}) are never
    answered; C{asked} holds the session id of each.
    """

    isLeaf = True

    def __init__(self, api: Resource) -> None:
        super().__init__()
        self.api = api
        self.asked: list[str] = []

    def render(self, request):
        if request.path.startswith(b"/ace/cmd/"):
            self.asked.append(request.path.rsplit(b"/", 1)[-1].decode())
            return NOT_DONE_YET
        return self.api.render(request)


@pytest_twisted.ensureDeferred
async def test_shutdown_ends_within_10s_with_a_hung_engine_and_a_stuck_player(
    engine, daemons, redis_server, monkeypatch
):
    """
    The worst case of a shutdown: the engine never answers C{stop} and a
    player never reads again.  The stop command gives up after its timeout,
    the stuck player's drain after its own, and the whole shutdown is over
    within 10 s, the players' bodies ended and the keys deleted.
    """
    site = engine.port.factory
    unanswered = UnansweredCommands(site.resource)
    monkeypatch.setattr(site, "resource", unanswered)
    asked = unanswered.asked
    daemon = await daemons([engine.config("engine-a")], redis=redis_server.url)
    player = await Player.open(daemon.stream_url(KEY))
    await player.wait_bytes(100 * PACKET_SIZE)
    session = daemon.registry.streams[KEY]
    stuck, _ = await stuck_player(daemon, session)
    (session_id,) = engine.engine.sessions
    try:
        started = reactor.seconds()
        await daemon.service.stopService().addTimeout(12, reactor)
        took = reactor.seconds() - started
    finally:
        stuck.transport.abortConnection()
    assert took < 10, f"the shutdown took {took:.1f}s"
    assert asked == [session_id]
    assert player.clean_end is True
    check(player.data)
    assert stream_keys(redis_server) == []


@pytest_twisted.ensureDeferred
async def test_sigterm_with_two_players(engine, redis_server, spawn):
    """
    C{twistd -n aceproxy} on Redis, two players; SIGTERM.  Both bodies end
    cleanly, the engine session is stopped, Redis holds no key of any
    stream, and the daemon ends in an orderly way within 10 s.  The admin
    token it was given appears in none of its output.
    """
    proxy = twistd(
        spawn,
        "aceproxy",
        "aceproxy",
        "--listen", "tcp:0:interface=127.0.0.1",
        "--engine", engine.url,
        "--redis", redis_server.url,
        "--admin-token", TOKEN,
    )
    port = (await proxy.wait_for_line(PROXY_LISTENING, timeout=20)).group(1)
    stream_url = f"http://127.0.0.1:{port}/ace/getstream?id={KEY}"
    players = [await Player.open(stream_url) for _ in range(2)]
    assert [p.response.code for p in players] == [200, 200], proxy.output()
    for player in players:
        await player.wait_bytes(200 * PACKET_SIZE)
    (session_id,) = engine.engine.sessions
    assert stream_keys(redis_server), "the stream is not in Redis"

    proxy.send_signal("TERM")
    exited = proxy.wait_exit(10)
    ends = [await player.ended.addTimeout(10, reactor) for player in players]
    await exited
    assert proxy.stopped_cleanly(), proxy.describe_end() + "\n" + proxy.output()
    assert proxy.exit_signal in (None, signal.SIGTERM), proxy.describe_end()
    assert ends == [True, True], proxy.output()
    for player in players:
        check(player.data)
    assert engine.engine.stopped == [session_id], proxy.output()
    assert stream_keys(redis_server) == [], proxy.output()
    assert not [line for line in proxy.lines if TOKEN in line]


# --- admin actions and logs ----------------------------------------------------------

def secrets_in(event: dict) -> list[str]:
    """
    Where a log event shows C{TOKEN} or C{WRONG}: in its formatted text, its
    failure's traceback or any of its raw values.
    """
    texts = {"text": formatEvent(event)}
    failure = event.get("log_failure")
    if failure is not None:
        texts["traceback"] = failure.getTraceback()
    for name, value in event.items():
        texts[name] = f"{value!s} {value!r}"
    return [
        f"{where}: {text[:200]}"
        for where, text in texts.items()
        for secret in (TOKEN, WRONG)
        if secret in text
    ]


@pytest_twisted.ensureDeferred
async def test_delete_needs_the_token_and_the_token_is_never_logged(engine):
    """
    With C{admin_token}, DELETE without it or with a wrong one is 401 and
    leaves the stream alone; with it, the stream stops.  No log event of the
    whole run, the proxy's start and stop included, shows either token.
    """
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        proxy = await start_proxy([engine.config("engine-a")], admin_token=TOKEN)
        try:
            player = await Player.open(proxy.stream_url(KEY))
            await player.wait_bytes(100 * PACKET_SIZE)
            url = f"{proxy.url}/streams/{KEY}"
            for authorization in (None, f"Bearer {WRONG}", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
                headers = {"Authorization": authorization} if authorization else None
                response = await treq.delete(url, headers=headers).addTimeout(5, reactor)
                body = await treq.json_content(response)
                assert response.code == 401, (authorization, response.code, body)
                assert response.headers.getRawHeaders(b"www-authenticate") == [b"Bearer"]
                assert "admin token" in body["error"]
            assert KEY in proxy.registry.streams
            await player.more(100 * PACKET_SIZE)

            response = await treq.delete(url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.code == 200
            assert await treq.json_content(response) == {"stopped": KEY}
            assert await player.ended.addTimeout(5, reactor) is True
            check(player.data)
        finally:
            await proxy.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("stopped through the API" in formatEvent(e) for e in events), "no events captured"
    leaks = [where for event in events for where in secrets_in(event)]
    assert not leaks, leaks


@attrs.define
class AddressedRequest:
    """Just what L{ProxyWeb._check_admin} reads of a request; no network."""

    address: object
    authorization: bytes | None = None

    def getClientAddress(self):
        return self.address

    def getHeader(self, name: bytes) -> bytes | None:
        return self.authorization if name.lower() == b"authorization" else None


@pytest.mark.parametrize(
    "address, allowed",
    [
        (IPv4Address("TCP", "127.0.0.1", 5555), True),
        (IPv4Address("TCP", "127.3.2.1", 5555), True),
        (IPv6Address("TCP", "::1", 5555), True),
        # An IPv4 client of a dual-stack (tcp6:...:interface=::) listener.
        (IPv6Address("TCP", "::ffff:127.0.0.1", 5555), True),
        (IPv4Address("TCP", "10.1.2.3", 5555), False),
        (IPv4Address("TCP", "192.0.2.7", 5555), False),
        (IPv6Address("TCP", "::ffff:10.1.2.3", 5555), False),
        (IPv6Address("TCP", "2001:db8::1", 5555), False),
        (IPv6Address("TCP", "fe80::1", 5555), False),
    ],
)
def test_without_a_token_admin_actions_are_for_loopback_only(address, allowed):
    web = ProxyWeb(streams=None)
    if allowed:
        web._check_admin(AddressedRequest(address))
    else:
        with pytest.raises(Forbidden) as refused_:
            web._check_admin(AddressedRequest(address))
        assert refused_.value.status == 403


@pytest.mark.parametrize(
    "address",
    [IPv4Address("TCP", "10.1.2.3", 5555), IPv4Address("TCP", "127.0.0.1", 5555), IPv6Address("TCP", "::1", 5555)],
)
def test_with_a_token_admin_actions_need_it_from_anywhere(address):
    web = ProxyWeb(streams=None, admin_token=TOKEN)
    web._check_admin(AddressedRequest(address, b"Bearer " + TOKEN.encode()))
    for authorization in (None, b"Bearer " + WRONG.encode(), TOKEN.encode(), b"Bearer "):
        with pytest.raises(Unauthorized) as refused_:
            web._check_admin(AddressedRequest(address, authorization))
        assert refused_.value.status == 401
        assert TOKEN not in refused_.value.message
