"""
Hostile and careless clients, over real sockets against the real proxy:
request bodies, bytes sent during a stream, method case, slow request
headers, connections and new streams per client address, and the daemon's
open-file limit.

Each refusal is a JSON C{{"error": ...}} with a proper status, and costs the
daemon no more than a small, fixed amount: no temporary file, no unbounded
buffer, no engine session, no descriptor held past a deadline.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater

from acestream_proxy.config import Config, ConfigError, Tuning, build
from acestream_proxy.errors import Unavailable
from acestream_proxy.http.limits import ClientLimits, is_loopback
from acestream_proxy.http.site import SEND_ALLOWANCE
from acestream_proxy.service import file_limit_needed
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.registry import LIMIT_RETRY_AFTER

from .rawplayer import RawPlayer, open_raw_player
from .support import HASHES, Player, RunningProxy, check_whole_packets, eventually, serve
from .test_end_to_end import TWISTD, spawn  # noqa: F401 (spawn: fixture)

KEY, OTHER, THIRD = HASHES[6], HASHES[7], HASHES[8]
ROOT = Path(__file__).resolve().parent.parent

#: What one read of a socket may take (Twisted's C{bufferSize}): a refused
#: body must cost no more than that.
ONE_READ = 64 * 1024


# --- helpers -----------------------------------------------------------------


def never(host: str) -> bool:
    """An C{exempt} predicate for tests: loopback clients are limited too."""
    return False


@pytest.fixture
def proxies(engine):
    """
    Start proxies on 127.0.0.1 as L{support.start_proxy} does, with the
    site's C{exempt} predicate given when a test needs loopback clients to
    be limited like any others.
    """
    started = []

    async def start(exempt=None, **tuning) -> RunningProxy:
        config = Config(
            listen="tcp:0:interface=127.0.0.1",
            engines=(engine.config("engine-a"),),
            tuning=Tuning(**tuning),
        )
        options = {} if exempt is None else {"exempt": exempt}
        proxy = await serve(config, **options)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        pytest_twisted.blockon(proxy.stop())


async def raw(port: int, request: bytes) -> RawPlayer:
    """A plain connection that sends C{request} (any bytes) and keeps every byte it gets."""
    client = RawPlayer()
    client.request = request
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)


def answer(client: RawPlayer) -> tuple[int, dict, dict | None]:
    """Status, headers (lower-case names) and JSON body of a whole response."""
    head = client.head
    assert head is not None, bytes(client.raw)
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = client.body()
    return int(status.split()[1]), headers, json.loads(body) if body else None


def assert_json_error(code: int, headers: dict, body, status: int, message: str = "") -> None:
    assert code == status, (code, headers, body)
    assert headers["content-type"] == "application/json"
    assert list(body) == ["error"] and message in body["error"], body


async def answered(port: int, request: bytes) -> tuple[int, dict, dict | None]:
    """Send C{request}, wait for the proxy to close the connection, read its answer."""
    client = await raw(port, request)
    await eventually(lambda: client.closed, what="the proxy to close the connection")
    return answer(client)


def count_reads(site) -> list[int]:
    """
    Every read the site's connections take from their sockets: the byte count
    of each C{dataReceived} the transports deliver, connection by connection.
    """
    reads: list[list[int]] = []
    build = site.buildProtocol

    def buildProtocol(addr):
        protocol = build(addr)
        mine: list[int] = []
        reads.append(mine)
        received = protocol.dataReceived

        def dataReceived(data: bytes):
            mine.append(len(data))
            return received(data)

        protocol.dataReceived = dataReceived
        return protocol

    site.buildProtocol = buildProtocol
    return reads


@pytest.fixture
def temp_files(monkeypatch) -> list:
    """Every temporary file made while the test runs (they are still made)."""
    made = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp"):
        original = getattr(tempfile, name)

        def record(*args, _original=original, _name=name, **kwargs):
            made.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tempfile, name, record)
    return made


def push_body(port: int, head: bytes, body: bytes) -> bytes:
    """
    A blocking client (run in a thread): send C{head}, then as much of
    C{body} as the proxy will take, then read whatever it answered until it
    closes.  A refusal may reset the connection under the sender: that ends
    sending, not reading.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(head)
            for at in range(0, len(body), ONE_READ):
                sock.sendall(body[at : at + ONE_READ])
        except OSError:
            pass
        received = bytearray()
        try:
            while data := sock.recv(65536):
                received += data
        except OSError:
            pass
        return bytes(received)


def parse(raw_bytes: bytes) -> tuple[int, dict, dict | None]:
    client = RawPlayer(request=b"-")
    client.raw += raw_bytes
    return answer(client)


# --- request bodies ------------------------------------------------------------

#: 20 MB: Twisted used to read all of it, and spool it to a temporary file.
BIG = 20 * 1024 * 1024

BODY_TARGETS = [
    ("GET", "/health"),
    ("GET", f"/ace/getstream?id={KEY}"),
    ("POST", "/streams"),
    ("DELETE", f"/streams/{KEY}"),
    ("PUT", "/nope"),
]


@pytest.mark.parametrize("framing", ["content-length", "chunked", "expect-100"])
@pytest.mark.parametrize("method, target", BODY_TARGETS)
@pytest_twisted.ensureDeferred
async def test_request_body_is_refused_with_413(proxies, temp_files, method, target, framing):
    """
    Any request with a body gets 413 JSON and a closed connection after one
    read at most (headers and the start of the body), and no temporary file
    is ever made for it; no engine session either.
    """
    proxy = await proxies()
    reads = count_reads(proxy.port.factory)
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method.encode(), target.encode())
    if framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        chunk = b"%x\r\n%s\r\n" % (ONE_READ, b"x" * ONE_READ)
        body = chunk * (BIG // ONE_READ)
    else:
        head += b"Content-Length: %d\r\n" % BIG
        if framing == "expect-100":
            head += b"Expect: 100-continue\r\n"
        head += b"\r\n"
        body = b"x" * BIG
    got = await threads.deferToThread(push_body, proxy.port.getHost().port, head, body)

    assert not got.startswith(b"HTTP/1.1 100"), got[:200]
    code, headers, error = parse(got)
    assert_json_error(code, headers, error, 413, "body")
    assert headers["connection"] == "close"
    assert len(reads) == 1 and sum(reads[0]) <= ONE_READ, reads
    assert temp_files == []
    assert proxy.registry.streams == {}


@pytest_twisted.ensureDeferred
async def test_empty_body_is_no_body(proxies, temp_files):
    """C{Content-Length: 0} is a request without a body: it is answered as usual."""
    proxy = await proxies()
    code, headers, body = await answered(
        proxy.port.getHost().port,
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert code == 200 and body["status"] == "ok", body
    assert temp_files == []


# --- bytes sent while a stream plays -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_player_that_keeps_sending_is_closed(proxies):
    """
    A player may send a pipelined request or two while it plays; one that
    keeps sending is closed once it passed the allowance, while another
    player of the stream plays on.  What it sent is never held beyond the
    allowance and one read.
    """
    proxy = await proxies()
    site = proxy.port.factory
    reads = count_reads(site)
    port = proxy.port.getHost().port
    healthy = await Player.open(proxy.stream_url(KEY))
    sender = open_raw_player(port, f"/ace/getstream?id={KEY}", rcvbuf=1 << 20)
    await eventually(lambda: len(sender.body()) > 100 * PACKET_SIZE, what="the stream")

    sender.transport.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2)
    got = len(sender.body())
    await eventually(lambda: len(sender.body()) > got + 300 * PACKET_SIZE, what="more stream")
    assert not sender.closed

    piece = b"x" * 1024
    for _ in range(4 * SEND_ALLOWANCE // len(piece)):
        sender.transport.write(piece)
    await eventually(lambda: sender.closed, what="the sending player closed")
    check_whole_packets(sender.body(), KEY)
    # Its connection took in at most the allowance and one read after its
    # request (and the two pipelined ones).
    assert sum(reads[-1]) <= SEND_ALLOWANCE + ONE_READ + 1024, reads[-1]

    await healthy.more(200 * PACKET_SIZE)
    check_whole_packets(healthy.data, KEY)
    assert len(proxy.registry.streams[KEY].players) == 1


# --- method names are case-sensitive -------------------------------------------


@pytest.mark.parametrize("method", ["get", "Get", "gET", "head", "post", "BREW"])
@pytest_twisted.ensureDeferred
async def test_method_is_case_sensitive(proxies, engine, method):
    """
    C{get} is not C{GET} (RFC 9110, 9.1): an unknown method gets 501 JSON,
    and no stream.
    """
    proxy = await proxies()
    request = b"%s /ace/getstream?id=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    code, headers, body = await answered(
        proxy.port.getHost().port, request % (method.encode(), KEY.encode())
    )
    assert_json_error(code, headers, body, 501, method)
    assert engine.engine.getstream_calls == []
    assert proxy.registry.streams == {}


# --- the header deadline -------------------------------------------------------

#: A deadline short enough for a quick test; the site uses the real reactor.
DEADLINE = 0.3


@pytest_twisted.ensureDeferred
async def test_slow_request_headers_are_cut_at_the_deadline(proxies):
    """
    A client that sends its request headers a byte at a time (slowloris)
    gets 408 JSON and is closed at the header deadline, however often it
    sends; one that sends nothing is closed without an answer.
    """
    proxy = await proxies(header_timeout=DEADLINE)
    port = proxy.port.getHost().port
    started = reactor.seconds()
    slow = await raw(port, b"G")
    idle = await raw(port, b"")
    trickle = b"ET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
    for byte in trickle:
        if slow.closed:
            break
        slow.transport.write(bytes([byte]))
        await deferLater(reactor, 0.01, lambda: None)
    assert slow.closed, "the slow client was never cut"
    took = reactor.seconds() - started
    assert DEADLINE <= took < DEADLINE + 2, took
    code, headers, body = answer(slow)
    assert_json_error(code, headers, body, 408, "headers")
    await eventually(lambda: idle.closed, what="the idle connection closed")
    assert bytes(idle.raw) == b""


@pytest_twisted.ensureDeferred
async def test_deadline_applies_between_requests_not_to_a_stream(proxies):
    """
    The deadline does not cut a response: a stream plays on well past it, and
    a persistent connection that sent a request in time is answered, then
    closed once it has sent no new request for as long.
    """
    proxy = await proxies(header_timeout=DEADLINE)
    port = proxy.port.getHost().port
    player = await Player.open(proxy.stream_url(KEY))
    kept = await raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await eventually(lambda: kept.head is not None, what="the health answer")
    assert kept.head.startswith(b"HTTP/1.1 200"), kept.head
    await eventually(lambda: kept.closed, what="the kept-alive connection closed")
    await deferLater(reactor, 3 * DEADLINE, lambda: None)
    await player.more(100 * PACKET_SIZE)
    assert player.clean_end is None, "the stream was cut"
    check_whole_packets(player.data, KEY)


# --- per-address limits ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_per_address_are_capped(proxies):
    """
    Past C{max_connections_per_address} open connections, a client's next
    one is answered 503 JSON with Retry-After and closed; once one of its
    connections closes, it is served again.
    """
    proxy = await proxies(exempt=never, max_connections_per_address=3)
    port = proxy.port.getHost().port
    limits = proxy.port.factory.limits
    held = [await raw(port, b"GET /he") for _ in range(3)]
    await eventually(lambda: limits.connections("127.0.0.1") == 3, what="three connections counted")

    code, headers, body = await answered(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert_json_error(code, headers, body, 503, "too many connections")
    assert headers["retry-after"] == str(LIMIT_RETRY_AFTER)
    assert limits.connections("127.0.0.1") == 3

    held[0].transport.loseConnection()
    await eventually(lambda: limits.connections("127.0.0.1") == 2, what="one connection released")
    code, _, body = await answered(
        port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert code == 200, body
    for client in held[1:]:
        client.transport.loseConnection()
    await eventually(lambda: limits.connections("127.0.0.1") == 0, what="every connection released")


@pytest_twisted.ensureDeferred
async def test_loopback_clients_are_not_limited_per_address(proxies):
    """
    By default a loopback client (the machine itself, or a reverse proxy on
    it) is not limited per address: it stands for many clients.
    """
    proxy = await proxies(max_connections_per_address=1, max_new_streams_per_address=1)
    port = proxy.port.getHost().port
    held = [await raw(port, b"GET /he") for _ in range(3)]
    code, _, body = await answered(
        port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert code == 200, body
    players = [await Player.open(proxy.stream_url(key)) for key in (KEY, OTHER)]
    assert [p.response.code for p in players] == [200, 200]
    for client in held:
        client.transport.loseConnection()
    for player in players:
        player.disconnect()


@pytest_twisted.ensureDeferred
async def test_new_streams_per_address_are_capped_not_joins(proxies, engine):
    """
    Past C{max_new_streams_per_address} new streams in a minute, a client's
    request for another new stream gets 503 JSON with Retry-After and no
    engine session; joining a stream that plays is not limited.
    """
    proxy = await proxies(exempt=never, max_new_streams_per_address=2)
    players = [await Player.open(proxy.stream_url(key)) for key in (KEY, OTHER)]
    assert [p.response.code for p in players] == [200, 200]

    refused = await Player.open(proxy.stream_url(THIRD))
    assert refused.response.code == 503
    body = await refused.json()
    assert "too many new streams" in body["error"], body
    (retry_after,) = refused.response.headers.getRawHeaders(b"retry-after")
    assert 0 < int(retry_after) <= 60
    assert engine.engine.getstream_calls == [("id", KEY), ("id", OTHER)]

    joined = await Player.open(proxy.stream_url(KEY))
    assert joined.response.code == 200
    await joined.wait_bytes(10 * PACKET_SIZE)
    for player in players + [joined]:
        player.disconnect()


def test_new_stream_budget_is_a_sliding_minute():
    """
    The budget counts the streams started in the last 60 s on the site's
    clock: the Retry-After it gives is when the oldest start leaves that
    window, a stream asked again within it counts once, and every address
    has its own.
    """
    clock = Clock()
    limits = ClientLimits(max_connections=0, max_new_streams=2, clock=clock)
    limits.take_new_stream("192.0.2.7", KEY)
    clock.advance(20)
    limits.take_new_stream("192.0.2.7", OTHER)
    limits.take_new_stream("192.0.2.7", KEY)
    with pytest.raises(Unavailable) as refused:
        limits.take_new_stream("192.0.2.7", THIRD)
    assert refused.value.retry_after == 40
    limits.take_new_stream("192.0.2.8", THIRD)
    clock.advance(40)
    limits.take_new_stream("192.0.2.7", THIRD)
    with pytest.raises(Unavailable) as refused:
        limits.take_new_stream("192.0.2.7", KEY)
    assert refused.value.retry_after == 20
    limits.take_new_stream(None, KEY)  # not limited: loopback, or not an IP address


def test_new_stream_budget_forgets_addresses_gone_quiet():
    """Addresses that started nothing for a window cost no memory after it."""
    clock = Clock()
    limits = ClientLimits(max_connections=0, max_new_streams=1, clock=clock)
    for n in range(1000):
        limits.take_new_stream(f"2001:db8::{n:x}", KEY)
    clock.advance(61)
    limits.take_new_stream("192.0.2.7", KEY)
    assert list(limits._starts) == ["192.0.2.7"]


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
     ("192.0.2.1", False), ("::ffff:192.0.2.1", False), ("2001:db8::1", False), ("x", False)],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_mapped_addresses_count_as_their_ipv4_address():
    """
    A dual-stack listener sees an IPv4 client as C{::ffff:a.b.c.d}: both
    spellings are one client.
    """
    limits = ClientLimits(max_connections=1, max_new_streams=1, clock=Clock(), exempt=never)
    assert limits.key_of_host("::ffff:192.0.2.1") == limits.key_of_host("192.0.2.1") == "192.0.2.1"
    assert limits.admit_connection("192.0.2.1")
    assert not limits.admit_connection(limits.key_of_host("::ffff:192.0.2.1"))


# --- the open-file limit ---------------------------------------------------------


def nofile(pid: int) -> tuple[int, int]:
    """The soft and hard open-file limits of process C{pid}."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit for {pid}")


def lowered_twistd(spawn, soft: int, hard: int | None, *arguments: str):
    """
    C{twistd -n aceproxy ...} started with its open-file limits lowered first
    (the hard one kept when C{hard} is L{None}), as C{prlimit} would.
    """
    lower = (
        "import resource; "
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard or 'hard'})); "
    )
    return spawn("aceproxy", "-c", lower + TWISTD, "-n", "--pidfile=", "aceproxy", *arguments)


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
@pytest_twisted.ensureDeferred
async def test_daemon_raises_its_open_file_limit(spawn, engine):
    """
    Started with a soft limit of 256, the daemon raises it to what
    C{max_clients} needs, and says so in one line.
    """
    needed = file_limit_needed(Tuning())
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed:
        pytest.skip(f"the hard open-file limit {hard} is below {needed}")
    daemon = lowered_twistd(
        spawn, 256, None, "--listen", "tcp:0:interface=127.0.0.1", "--engine", engine.url
    )
    line = await daemon.wait_for_line(r"open-file limit", timeout=20)
    assert f"raised the open-file limit from 256 to {needed}" in line.string, line.string
    await daemon.wait_for_line(r"\bSite starting on (\d+)\b", timeout=20)
    assert nofile(daemon.transport.pid) == (needed, hard)


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
@pytest_twisted.ensureDeferred
async def test_daemon_says_why_it_cannot_raise_its_open_file_limit(spawn, engine):
    """
    With a hard limit below what C{max_clients} needs, the daemon raises its
    soft limit as far as it may, says in one line why that is not enough,
    and serves anyway.
    """
    daemon = lowered_twistd(
        spawn, 128, 256, "--listen", "tcp:0:interface=127.0.0.1", "--engine", engine.url
    )
    line = await daemon.wait_for_line(r"open-file limit", timeout=20)
    needed = file_limit_needed(Tuning())
    assert re.search(rf"\b{needed}\b", line.string) and "LimitNOFILE" in line.string, line.string
    assert "max_clients" in line.string
    match = await daemon.wait_for_line(r"\bSite starting on (\d+)\b", timeout=20)
    assert nofile(daemon.transport.pid) == (256, 256)
    # Healthy once its engine has passed the first probe.
    await daemon.wait_for_line(r"engine \S+ is healthy", timeout=20)
    response = await treq.get(f"http://127.0.0.1:{match.group(1)}/health", persistent=False)
    assert response.code == 200


def test_systemd_unit_allows_the_files_max_clients_needs():
    """
    The unit's C{LimitNOFILE} covers the default C{max_clients} (and then
    some), and systemd, where it is installed, finds the unit valid.
    """
    unit = ROOT / "systemd" / "aceproxy.service"
    text = unit.read_text()
    (limit,) = re.findall(r"^LimitNOFILE=(\d+)$", text, re.MULTILINE)
    assert int(limit) >= 2 * file_limit_needed(Tuning())
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / unit.name
        copy.write_text(text.replace("/opt/aceproxy/.venv/bin/twistd", sys.executable))
        result = subprocess.run(
            [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stderr
    assert str(copy) not in result.stderr, result.stderr


# --- configuration ---------------------------------------------------------------


def test_per_address_limits_may_be_zero_the_deadline_may_not():
    """
    0 turns a per-address limit off (behind a reverse proxy on another
    machine); a header deadline of 0 would close every connection at once.
    """
    tuning = build(
        {"tuning": {"max_connections_per_address": 0, "max_new_streams_per_address": 0}}
    ).tuning
    assert (tuning.max_connections_per_address, tuning.max_new_streams_per_address) == (0, 0)
    for key, value, wanted in [
        ("max_connections_per_address", -1, "a non-negative integer"),
        ("max_new_streams_per_address", 1.5, "a non-negative integer"),
        ("header_timeout", 0, "a positive number"),
    ]:
        with pytest.raises(ConfigError) as refused:
            build({"tuning": {key: value}})
        assert str(refused.value) == f"tuning.{key}: expected {wanted}, got {value}"


def test_unlimited_address_limits_admit_everything():
    limits = ClientLimits(max_connections=0, max_new_streams=0, clock=Clock(), exempt=never)
    for n in range(100):
        assert limits.admit_connection("192.0.2.1")
        limits.take_new_stream("192.0.2.1", f"{n:040x}")
