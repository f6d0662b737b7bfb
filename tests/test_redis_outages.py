"""
Redis frozen, restarted, refusing, or asking for a password, with a real
redis-server, the simulated engine and the proxy on sockets of 127.0.0.1:

- connections come back by themselves whatever happened (a freeze longer
  than the command timeout, a restart that loads its dataset, C{-LOADING}
  to the connection's own first commands, a wrong password put right);
- while Redis cannot be reached a new player is refused at once, with
  C{Retry-After}, and one that asks while a connection is being made is
  served as soon as it is up, or refused within a second;
- a player who leaves while Redis is down still ends its stream, and the
  stream's keys are deleted once Redis is back;
- error replies (C{READONLY}, C{OOM}) are logged once per outage, without
  tracebacks, and the stream carries on;
- C{redis://user:password@...}, C{redis://:password@...} and C{rediss://}
  work, and the password is never shown.

A freeze is C{SIGSTOP}: the kernel still accepts connections, nothing is
answered.  The stimulus (how long Redis stays frozen) is a fixed wait; every
outcome is waited for with a deadline.
"""

import functools
import shutil

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from acestream_proxy.config import build
from acestream_proxy.config_checks import ConfigError
from acestream_proxy.store import keys
from acestream_proxy.store import redis as redis_module
from acestream_proxy.store.address import RedisAddress
from acestream_proxy.store.redis import RedisStore
from acestream_proxy.stream.mpegts import PACKET_SIZE

from .redis_server import LoadingFront, RedisServer, TLSFront
from .support import HASHES, Player, check_whole_packets, eventually

KEY = HASHES[0]

#: Quick grace and lease ticks; chunks and stream keys that live far longer
#: than a test waits, so that keys found gone were deleted, not expired.
TUNING = dict(
    cleanup_grace=0.5,
    heartbeat_interval=0.5,
    ghost_client_timeout=3,
    owner_lease=1.5,
    chunk_ttl=30.0,
    buffer_chunks=50,
)

#: What the issue allows between Redis answering again and the proxy
#: serving: /health 200 and a new player streaming.
BACK_WITHIN = 5.0

#: The command timeout of the Redis store, as the daemon runs it.
COMMAND_TIMEOUT = 5.0


# --- helpers -----------------------------------------------------------------


@pytest.fixture
def logged():
    """
    Every log event of the test, from every logger.
    """
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture(autouse=True)
def no_traceback(logged):
    """
    Whatever Redis does, nothing logs a traceback.
    """
    yield
    failures = [formatEvent(e) for e in logged if e.get("log_failure") is not None]
    assert failures == []


@pytest.fixture
def quick_timeout(monkeypatch):
    """
    The daemon's Redis store with a 1 s command timeout instead of 5 s, so
    that a freeze is noticed sooner.  (The daemon imports the Redis store
    when it makes one.)
    """
    monkeypatch.setattr(
        redis_module, "RedisStore", functools.partial(RedisStore, op_timeout=1.0)
    )
    return 1.0


@pytest.fixture
def new_server():
    """
    Makes redis-servers of the test's own (with a password, say), stopped
    after the test.
    """
    made = []

    def make(**options) -> RedisServer:
        made.append(RedisServer(**options))
        return made[-1]

    yield make
    for server in made:
        if server.process is not None:
            server.resume()
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def resumed(redis_server):
    """
    The test's redis-server, thawed at teardown if the test left it frozen.
    """
    yield redis_server
    if redis_server.process is not None:
        redis_server.resume()


async def health(proxy) -> tuple[int, dict]:
    response = await treq.get(proxy.url + "/health")
    return response.code, await treq.json_content(response)


async def until_health(proxy, code: int, timeout: float) -> dict:
    """
    Poll /health until it answers C{code}; fail after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        got, body = await health(proxy)
        if got == code:
            return body
        if reactor.seconds() > deadline:
            raise AssertionError(f"/health still {got} {body} after {timeout}s")
        await deferLater(reactor, 0.05, lambda: None)


async def refused_at_once(url: str, within: float = 1.0) -> dict:
    """
    Ask for a stream and check that it is refused with 503 and
    C{Retry-After} within C{within} seconds.
    """
    asked = reactor.seconds()
    response = await treq.get(url)
    body = await treq.json_content(response)
    took = reactor.seconds() - asked
    assert response.code == 503, (response.code, body)
    assert response.headers.getRawHeaders(b"retry-after"), body
    assert took < within, f"refused after {took:.2f}s"
    return body


async def streams_by(url: str, deadline: float) -> Player:
    """
    A new player that gets 200 and whole packets before C{deadline}.
    """
    player = await Player.open(url)
    assert player.response.code == 200, await treq.content(player.response)
    await player.wait_bytes(50 * PACKET_SIZE, timeout=max(0.1, deadline - reactor.seconds()))
    return player


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def stream_keys(client, key: str = KEY) -> list[str]:
    return client.keys(keys.stream(key) + ":*")


# --- connections come back whatever happened ---------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_frozen_longer_than_the_command_timeout(resumed, engine, proxy_factory):
    """
    Redis frozen for twice the command timeout and more: commands time out,
    and so does the first command of each new connection.  Once Redis
    answers again, within 5 s /health is 200 and a new player streams; the
    player who stayed got the broadcast on, and the stream's keys are back.
    """
    redis_server = resumed
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(100 * PACKET_SIZE)

    redis_server.pause()
    await until_health(proxy, 503, timeout=COMMAND_TIMEOUT + 2)
    # The player is served by this worker alone, within a lease tick.
    await player.more(100 * PACKET_SIZE, timeout=TUNING["owner_lease"] / 3 + 2)
    await sleep(2 * COMMAND_TIMEOUT + 1)
    await player.more(100 * PACKET_SIZE, timeout=2)
    redis_server.resume()
    back = reactor.seconds()

    body = await until_health(proxy, 200, timeout=BACK_WITHIN)
    assert body["redis"] == "up"
    newcomer = await streams_by(proxy.stream_url(HASHES[1]), back + BACK_WITHIN)
    check_whole_packets(newcomer.data, HASHES[1])
    await player.more(100 * PACKET_SIZE, timeout=5)
    check_whole_packets(player.data, KEY, allowed_jumps=1)
    client = redis_server.client()
    await eventually(
        lambda: client("HGET", keys.metadata(KEY), "status") == b"started",
        timeout=5,
        what="the stream's metadata written back",
    )
    client.close()
    player.disconnect()
    newcomer.disconnect()


@pytest_twisted.ensureDeferred
async def test_redis_restarted_loading_its_dataset(redis_server, engine, proxy_factory):
    """
    Redis restarted on a dataset that takes seconds to load answers
    C{-LOADING} meanwhile: the store counts as down (/health 503, new
    players refused at once), the owner's player streams on, and within 5 s
    of Redis serving again /health is 200 and a new player streams.
    """
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(100 * PACKET_SIZE)
    redis_server.save_ballast()

    redis_server.restart_loading()
    body = await until_health(proxy, 503, timeout=3)
    assert body["redis"] == "down"
    assert redis_server.command("PING").startswith("-LOADING"), "loaded too soon for the test"
    await refused_at_once(proxy.stream_url(HASHES[1]))
    await player.more(100 * PACKET_SIZE, timeout=3)

    await eventually(lambda: redis_server.command("PING") == "+PONG", timeout=30, what="loaded")
    back = reactor.seconds()
    await until_health(proxy, 200, timeout=BACK_WITHIN)
    newcomer = await streams_by(proxy.stream_url(HASHES[1]), back + BACK_WITHIN)
    check_whole_packets(newcomer.data, HASHES[1])
    await player.more(100 * PACKET_SIZE, timeout=5)
    player.disconnect()
    newcomer.disconnect()


@pytest_twisted.ensureDeferred
async def test_loading_answer_to_the_first_commands_of_a_connection(
    redis_server, engine, proxy_factory
):
    """
    A server that answers even C{SELECT} with C{-LOADING} (as one in front
    of a loading Redis may): each connection is tried again until it is
    served, and within 5 s of that the proxy serves.  The redis-server
    here serves C{SELECT} while loading, so a front plays the server.
    """
    front = LoadingFront(redis_server).start()
    try:
        url = f"redis://{front.address}/1"
        proxy = await proxy_factory([engine.config("engine-a")], redis=url, **TUNING)
        # Several attempts of every connection, each answered -LOADING.
        await sleep(3)
        body = await until_health(proxy, 503, timeout=1)
        assert body["redis"] == "down"
        front.loading = False
        back = reactor.seconds()
        await until_health(proxy, 200, timeout=BACK_WITHIN)
        player = await streams_by(proxy.stream_url(KEY), back + BACK_WITHIN)
        check_whole_packets(player.data, KEY)
        client = redis_server.client()
        client("SELECT", 1)
        assert client("HGET", keys.metadata(KEY), "status") == b"started"
        client.close()
        player.disconnect()
    finally:
        await front.stop()


# --- new players while Redis is down -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_new_players_refused_at_once_while_redis_is_down(
    redis_server, engine, proxy_factory
):
    """
    With Redis gone, a player of the stream already here and a player of a
    new one both get 503 with Retry-After at once, not after the command
    timeout; the player already here streams on; Redis back, players are
    served again.
    """
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(50 * PACKET_SIZE)

    redis_server.stop()
    await until_health(proxy, 503, timeout=2)
    for key in (KEY, HASHES[1]):
        body = await refused_at_once(proxy.stream_url(key))
        assert "redis" in body["error"].lower() or "store" in body["error"].lower(), body
    await player.more(100 * PACKET_SIZE, timeout=3)

    redis_server.start()
    back = reactor.seconds()
    await until_health(proxy, 200, timeout=BACK_WITHIN)
    newcomer = await streams_by(proxy.stream_url(HASHES[1]), back + BACK_WITHIN)
    player.disconnect()
    newcomer.disconnect()


@pytest_twisted.ensureDeferred
async def test_player_asking_while_a_connection_is_being_made(
    resumed, engine, proxy_factory, quick_timeout
):
    """
    Redis frozen: the proxy's connections are lost and new ones wait for
    an answer.  A player who asks then is refused within a second if Redis
    stays frozen, and served as soon as the connection is up if Redis
    answers meanwhile.
    """
    redis_server = resumed
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(50 * PACKET_SIZE)

    redis_server.pause()
    await until_health(proxy, 503, timeout=quick_timeout + 2)
    await refused_at_once(proxy.stream_url(HASHES[1]))
    await sleep(quick_timeout)
    await refused_at_once(proxy.stream_url(HASHES[1]))

    asking = Player.open(proxy.stream_url(HASHES[1]))
    await sleep(0.3)
    redis_server.resume()
    newcomer = await asking
    assert newcomer.response.code == 200, await treq.content(newcomer.response)
    await newcomer.wait_bytes(50 * PACKET_SIZE, timeout=5)
    check_whole_packets(newcomer.data, HASHES[1])
    player.disconnect()
    newcomer.disconnect()


# --- a player leaving while Redis is down ------------------------------------


@pytest_twisted.ensureDeferred
async def test_player_leaving_while_redis_is_frozen_ends_the_stream(
    resumed, engine, proxy_factory, quick_timeout
):
    """
    The last player leaves while Redis is frozen: after the grace, counted
    here, the owner stops the stream and tells the engine to stop.  When
    Redis answers again, the stream's keys (which would live a minute more)
    are deleted.
    """
    redis_server = resumed
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(50 * PACKET_SIZE)
    [session] = engine.engine.sessions
    client = redis_server.client()
    await eventually(lambda: client("EXISTS", keys.metadata(KEY)) == 1, what="the metadata")
    assert client("PTTL", keys.metadata(KEY)) > 30_000

    redis_server.pause()
    await until_health(proxy, 503, timeout=quick_timeout + 2)
    player.disconnect()
    await eventually(
        lambda: session in engine.engine.stopped,
        timeout=TUNING["owner_lease"] + TUNING["cleanup_grace"] + 3,
        what="the engine told to stop",
    )
    await eventually(lambda: not proxy.registry.streams, timeout=2, what="the stream gone")
    assert engine.engine.stopped == [session]

    redis_server.resume()
    await eventually(lambda: stream_keys(client) == [], timeout=5, what="the stream's keys deleted")
    await until_health(proxy, 200, timeout=BACK_WITHIN)
    client.close()


@pytest.mark.parametrize(
    "meanwhile, kept",
    [
        ({}, False),
        ({"owner": "worker-b"}, True),
        ({"owner": "worker-a"}, False),
        ({"session": "new-session"}, True),
        ({"session": "ended-session"}, False),
    ],
    ids=["nobody", "another-worker", "our-lease", "another-session", "same-session"],
)
@pytest_twisted.ensureDeferred
async def test_keys_of_a_stream_ended_during_an_outage(redis_server, meanwhile, kept):
    """
    The keys of a stream that ended while Redis could not be reached are
    deleted once it serves (and the stream's end announced), unless by
    then another worker holds its lease or another session of it was
    recorded: those keys are the stream's new life, not the ended one's.
    """
    store = RedisStore(
        url=redis_server.url,
        reactor=reactor,
        worker_id="worker-a",
        buffer_chunks=5,
        chunk_ttl=30.0,
        ghost_client_timeout=30.0,
        owner_lease=30.0,
    )
    store.startService()
    try:
        await eventually(lambda: store.available, what="the store connected")
        heard = []
        store.listen(KEY, heard.append)
        admin = redis_server.client()
        await store.put_stream(KEY, {"status": "started", "playback_session_id": "ended-session"})
        await store.add_player(KEY, "p1", {"address": "a"})
        if "session" in meanwhile:
            await store.put_stream(KEY, {"playback_session_id": meanwhile["session"]})
        if "owner" in meanwhile:
            admin("SET", keys.owner(KEY), meanwhile["owner"])

        store.forget_stream_when_back(KEY, "ended-session")
        await eventually(lambda: KEY not in store._ended, what="the keys' fate settled")
        if kept:
            assert admin("EXISTS", keys.metadata(KEY)) == 1
            assert admin("SMEMBERS", keys.clients(KEY)) == [b"p1"]
            await sleep(0.2)
            assert [e["event"] for e in heard] == []
        else:
            assert stream_keys(admin) == []
            await eventually(lambda: heard, what="the end announced")
            assert [(e["event"], e["worker_id"]) for e in heard] == [
                ("stream_stopping", "worker-a")
            ]
        admin.close()
    finally:
        await store.stopService()


# --- error replies -----------------------------------------------------------


def _replica_of(other):
    def refuse(admin):
        admin("REPLICAOF", "127.0.0.1", other.port)

    def serve(admin):
        admin("REPLICAOF", "NO", "ONE")

    return refuse, serve


def _out_of_memory(admin):
    admin("CONFIG", "SET", "maxmemory-policy", "noeviction")
    admin("CONFIG", "SET", "maxmemory", "1")


def _memory_again(admin):
    admin("CONFIG", "SET", "maxmemory", "0")


@pytest.mark.parametrize("reason", ["READONLY", "OOM"])
@pytest_twisted.ensureDeferred
async def test_error_replies_are_logged_once_per_outage(
    reason, redis_server, new_server, engine, proxy_factory, logged
):
    """
    Redis refusing writes for a few seconds (a master demoted to a replica,
    a full memory): the player streams on, nothing logs a traceback, the
    refusal is logged once by the store and at most once by each other
    part, and once Redis serves again the stream's chunks are stored again
    and a new player is served.
    """
    if reason == "READONLY":
        refuse, serve = _replica_of(new_server().start())
    else:
        refuse, serve = _out_of_memory, _memory_again
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(50 * PACKET_SIZE)
    admin = redis_server.client()

    del logged[:]
    refuse(admin)
    refused_at = reactor.seconds()
    # Three seconds of chunks (about sixty appends) and six lease ticks.
    while reactor.seconds() - refused_at < 3:
        await player.more(20 * PACKET_SIZE, timeout=3)
    during = list(logged)
    serve(admin)

    tracebacks = [formatEvent(e) for e in during if e.get("log_failure") is not None]
    assert tracebacks == []
    warnings = [e for e in during if e.get("log_level") in (LogLevel.warn, LogLevel.error)]
    texts = [formatEvent(e) for e in warnings]
    assert any(reason in text for text in texts), texts
    by_source = {}
    for event in warnings:
        source = (event.get("log_namespace"), event.get("log_format"), event.get("what"))
        by_source[source] = by_source.get(source, 0) + 1
    assert max(by_source.values()) == 1, texts
    store_said = [e for e in warnings if e.get("log_namespace", "").startswith("acestream_proxy.store")]
    assert len(store_said) == 1, texts

    index = keys.buffer_index(KEY)
    await eventually(lambda: admin("EXISTS", index) == 1, timeout=5, what="appends again")
    first = int(admin("GET", index))
    await eventually(lambda: int(admin("GET", index)) > first + 10, timeout=5, what="appends")
    newcomer = await streams_by(proxy.stream_url(HASHES[1]), reactor.seconds() + 5)
    check_whole_packets(player.data, KEY, allowed_jumps=1)
    assert any(
        "serves again" in formatEvent(e) or "back" in formatEvent(e) for e in logged[len(during):]
    ), [formatEvent(e) for e in logged[len(during):]]
    admin.close()
    player.disconnect()
    newcomer.disconnect()


# --- passwords and TLS -------------------------------------------------------


SECRET = "s3cret-pa55word"
USER_SECRET = "user-s3cret-pa55"


def assert_never_shown(secret: str, logged: list, *texts: str) -> None:
    """
    C{secret} appears in no log event (its text, its fields, its
    traceback) nor in any of C{texts}.
    """
    for event in logged:
        shown = formatEvent(event) + repr(event)
        failure = event.get("log_failure")
        if failure is not None:
            shown += failure.getTraceback()
        assert secret not in shown, shown
    for text in texts:
        assert secret not in text, text


@pytest.mark.parametrize(
    "credentials",
    [f":{SECRET}@", f"{SECRET}@", f"aceproxy:{USER_SECRET}@"],
    ids=["colon-password", "password", "acl-user"],
)
@pytest_twisted.ensureDeferred
async def test_password_in_the_url(credentials, new_server, engine, proxy_factory, logged):
    """
    C{redis://[user:]password@host:port/db}: the proxy authenticates (as
    the default user or as an ACL user) and streams; the password shows
    nowhere: not in the log, /health, /streams, the store's description or
    repr, nor the error a player gets once Redis is gone.
    """
    server = new_server(password=SECRET).start()
    admin = server.client()
    admin("ACL", "SETUSER", "aceproxy", "on", f">{USER_SECRET}", "~*", "&*", "+@all")
    url = f"redis://{credentials}127.0.0.1:{server.port}/2"
    assert build({"redis": url}).redis == url
    proxy = await proxy_factory([engine.config("engine-a")], redis=url, **TUNING)
    await until_health(proxy, 200, timeout=5)
    player = await streams_by(proxy.stream_url(KEY), reactor.seconds() + 5)
    admin("SELECT", 2)
    assert admin("HGET", keys.metadata(KEY), "status") == b"started"
    if credentials.startswith("aceproxy"):
        clients = admin("CLIENT", "LIST").decode()
        assert "user=aceproxy" in clients, clients
    admin.close()

    store = proxy.registry.store
    shown = [
        store.address.describe(),
        repr(store.address),
        repr(store),
        str(await (await treq.get(proxy.url + "/health")).text()),
        str(await (await treq.get(proxy.url + "/streams")).text()),
    ]
    server.stop()
    await until_health(proxy, 503, timeout=2)
    shown.append(str(await refused_at_once(proxy.stream_url(HASHES[1]))))
    assert_never_shown(SECRET, logged, *shown)
    assert_never_shown(USER_SECRET, logged, *shown)
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_tried_again_and_never_shown(
    new_server, engine, proxy_factory, logged
):
    """
    A password Redis refuses: the store stays down, the refusal is logged
    once without the password, and it keeps trying: once Redis takes that
    password, the proxy serves within 5 s.
    """
    server = new_server(password=SECRET).start()
    wrong = "not-the-" + SECRET
    url = f"redis://:{wrong}@127.0.0.1:{server.port}/0"
    proxy = await proxy_factory([engine.config("engine-a")], redis=url, **TUNING)
    await sleep(2)
    body = await until_health(proxy, 503, timeout=1)
    assert body["redis"] == "down"
    refusals = [formatEvent(e) for e in logged if "WRONGPASS" in formatEvent(e)]
    assert len(refusals) == 1, refusals

    admin = server.client()
    admin("CONFIG", "SET", "requirepass", wrong)
    admin.close()
    server.password = wrong
    back = reactor.seconds()
    await until_health(proxy, 200, timeout=BACK_WITHIN)
    player = await streams_by(proxy.stream_url(KEY), back + BACK_WITHIN)
    assert_never_shown(wrong, logged)
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_rediss_with_a_password(new_server, engine, proxy_factory, logged):
    """
    C{rediss://:password@host:port/db?ssl_ca_certs=...}: TLS, verified
    against the given certificate authority, to a Redis that wants a
    password.  (The redis-server here has no TLS: a TLS front relays to
    it.)
    """
    server = new_server(password=SECRET).start()
    front = TLSFront(server).start()
    try:
        url = f"rediss://:{SECRET}@{front.address}/0?ssl_ca_certs={front.ca_path}"
        assert build({"redis": url}).redis == url
        proxy = await proxy_factory([engine.config("engine-a")], redis=url, **TUNING)
        await until_health(proxy, 200, timeout=5)
        player = await streams_by(proxy.stream_url(KEY), reactor.seconds() + 5)
        check_whole_packets(player.data, KEY)
        client = server.client()
        assert client("HGET", keys.metadata(KEY), "status") == b"started"
        client.close()
        assert "TLS" in proxy.registry.store.address.describe()
        assert_never_shown(SECRET, logged, repr(proxy.registry.store))
        player.disconnect()
    finally:
        await front.stop()


@pytest_twisted.ensureDeferred
async def test_rediss_refuses_a_certificate_it_cannot_verify(
    new_server, engine, proxy_factory, logged
):
    """
    Without the certificate authority that signed the server's
    certificate, the store does not connect: /health says Redis is down,
    the failure is logged once, not once per attempt.
    """
    server = new_server().start()
    front = TLSFront(server).start()
    try:
        url = f"rediss://{front.address}/0"
        proxy = await proxy_factory([engine.config("engine-a")], redis=url, **TUNING)
        await sleep(3)
        body = await until_health(proxy, 503, timeout=1)
        assert body["redis"] == "down"
        store_warnings = [
            formatEvent(e)
            for e in logged
            if e.get("log_namespace", "").startswith("acestream_proxy.store")
            and e.get("log_level") is LogLevel.warn
        ]
        assert len(store_warnings) == 1, store_warnings
        assert server.client()("DBSIZE") == 0
    finally:
        await front.stop()


# --- the URL -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url, address",
    [
        ("redis://:pw@db.example:6380/2", ("db.example", 6380, 2, None, "pw", False)),
        ("redis://pw@db.example/2", ("db.example", 6379, 2, None, "pw", False)),
        ("redis://user:pw@db.example", ("db.example", 6379, 0, "user", "pw", False)),
        (
            "redis://user:p%40ss%3Aword@db.example",
            ("db.example", 6379, 0, "user", "p@ss:word", False),
        ),
        ("rediss://db.example", ("db.example", 6379, 0, None, None, True)),
        ("rediss://:pw@db.example:6390/3", ("db.example", 6390, 3, None, "pw", True)),
    ],
)
def test_redis_urls_with_credentials_and_tls(url, address):
    assert build({"redis": url}).redis == url
    parsed = RedisAddress.parse(url)
    assert (
        parsed.host,
        parsed.port,
        parsed.db,
        parsed.username,
        parsed.password,
        parsed.tls,
    ) == address
    if parsed.password:
        assert parsed.password not in parsed.describe()
        assert parsed.password not in repr(parsed)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@db.example:port/0",
        "redis://user:hunter2@db.example/zero",
        "rediss://:hunter2@/0",
        "redis://:hunter2@db.example/0?ssl_ca_certs=/ca.pem",
        "rediss://:hunter2@db.example/0?ssl_ca_certs=",
        "rediss://:hunter2@db.example/0?other=1",
        "redis://user:@db.example/0",
        "redis://@db.example/0",
        "redis://:hunter2/x@db.example/0",
        "redis:hunter2@db.example/0",
    ],
)
def test_bad_redis_url_is_shown_without_its_password(url):
    with pytest.raises(ConfigError) as refused:
        build({"redis": url})
    message = str(refused.value)
    assert message.startswith("redis: expected "), message
    assert "hunter2" not in message
    assert "***@" in message
