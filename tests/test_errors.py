"""
Every error a client can cause or meet, through real sockets: a JSON body
C{{"error": message}} with C{Content-Type: application/json} and the status
that says what went wrong, never a traceback or an HTML page; and after a
failed start nothing of the stream is left, on the proxy or on the engine.
"""

import json
from urllib.parse import quote, unquote_to_bytes

import attrs
import hypothesis
import pytest
import pytest_twisted
import treq
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent
from twisted.web.http import parse_qs
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from acestream_proxy.testing.engine import FOREIGN_HOST, SimulatedEngine

from .support import HASHES, Player, StreamStops, start_engine, start_proxy, watched

KEY = HASHES[0]
OTHER = HASHES[1]
TOKEN = "s3cret-token"

#: What the proxy knows how to answer 200 to, as the router sees the path.
ROUTES = {"/ace/getstream", "/streams", "/engines", "/health", "/status"}
#: The status page's files (test_status_page.py), the only answers not JSON.
PAGE_ROUTES = {"/": "text/html", "/status.js": "text/javascript", "/status.css": "text/css"}


@attrs.frozen
class Answer:
    """
    A response as the client saw it; C{body} is L{None} for a stream body,
    which is closed as soon as its headers are in.
    """

    code: int
    headers: Headers
    body: bytes | None

    def header(self, name: str) -> list[str]:
        return self.headers.getRawHeaders(name, [])

    def json(self):
        return json.loads(self.body)


class _HangUp(Protocol):
    def makeConnection(self, transport):
        transport.stopProducing()


async def fetch(url: str, method: str = "GET", headers: dict | None = None) -> Answer:
    """
    Send one request with C{url} exactly as given (no normalisation of dots,
    slashes or escapes) on a fresh connection.
    """
    agent = Agent(reactor)
    response = await agent.request(
        method.encode(),
        url.encode("ascii"),
        Headers({k: [v] for k, v in (headers or {}).items()}),
    )
    types = response.headers.getRawHeaders(b"content-type", [])
    if response.code == 200 and types == [b"video/mp2t"] and method != "HEAD":
        response.deliverBody(_HangUp())
        return Answer(response.code, response.headers, None)
    return Answer(response.code, response.headers, await treq.content(response))


def assert_error(answer: Answer, code: int, message: str | None = None) -> str:
    """
    The answer is C{code} with a one-key JSON error body; return its message.
    """
    assert answer.code == code, (answer.code, answer.body)
    assert answer.header("content-type") == ["application/json"], answer.header("content-type")
    if answer.body == b"":
        return ""  # HEAD
    body = answer.json()
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str) and body["error"].strip()
    assert "Traceback" not in body["error"]
    if message is not None:
        assert message in body["error"], body["error"]
    return body["error"]


@pytest.fixture(scope="module")
def shared():
    """
    One engine and one proxy for the tests whose requests change nothing
    that lasts: bad requests, unknown paths, wrong methods, fuzzing.
    """
    engine = start_engine(bitrate=500_000)
    proxy = pytest_twisted.blockon(start_proxy([engine.config("engine-a")], cleanup_grace=0.2))
    StreamStops.watch(proxy.registry)
    yield engine, proxy
    pytest_twisted.blockon(proxy.stop())
    pytest_twisted.blockon(engine.stop())


async def no_stream_left(proxy) -> None:
    """
    Once every stream of the proxy has stopped (a failed start stops its
    stream before its players are answered, a stream without players once
    its grace is over), the proxy has no session and its store no stream;
    and since a stop waits for the engine's answer, the engine has ended
    every session the proxy stopped, and their playback connections.
    """
    await StreamStops.of(proxy.registry).all_stopped()
    assert proxy.registry.streams == {}
    assert await proxy.registry.store.list_streams() == []


# 400: the stream key


BAD_KEYS = [
    # (query after the parameter name, what the message says)
    ("=", "must be 40 hexadecimal characters"),
    ("=" + KEY[:39], "must be 40 hexadecimal characters"),
    ("=" + KEY + "0", "must be 40 hexadecimal characters"),
    ("=" + "g" * 40, "must be 40 hexadecimal characters"),
    ("=" + "x" + KEY[1:], "must be 40 hexadecimal characters"),
    ("=" + KEY[:20] + "%20" + KEY[21:], "must be 40 hexadecimal characters"),
    ("=%ZZ" + KEY[3:], "must be 40 hexadecimal characters"),
    ("=" + "%ff" * 40, "must be 40 hexadecimal characters"),
    ("=" + "%e2%80%8b" + KEY[1:], "must be 40 hexadecimal characters"),
    ("=" + KEY + "%00", "must be 40 hexadecimal characters"),
    ("=" + KEY + "%0a", "must be 40 hexadecimal characters"),
    ("=%2B" + KEY[1:], "must be 40 hexadecimal characters"),
    ("=+" + KEY[1:], "must be 40 hexadecimal characters"),
    ("=" + KEY + "&{param}=" + KEY, "given more than once"),
    ("=" + KEY + "&{param}=" + OTHER, "given more than once"),
    ("=" + KEY + "&{param}=", "given more than once"),
    ("=" + KEY + ";{param}=" + KEY, "given more than once"),
    ("=" + KEY + "&{other}=" + KEY, "not both"),
    ("=" + KEY + "&{other}=junk", "not both"),
]


@pytest.mark.parametrize("param", ["id", "infohash"])
@pytest.mark.parametrize("rest, message", BAD_KEYS)
@pytest_twisted.ensureDeferred
async def test_bad_stream_key_is_400(shared, param, rest, message):
    engine, proxy = shared
    calls = len(engine.engine.getstream_calls)
    other = "infohash" if param == "id" else "id"
    query = param + rest.format(param=param, other=other)
    answer = await fetch(f"{proxy.url}/ace/getstream?{query}")
    assert_error(answer, 400, message)
    head = await fetch(f"{proxy.url}/ace/getstream?{query}", "HEAD")
    assert_error(head, 400)
    assert len(engine.engine.getstream_calls) == calls


@pytest.mark.parametrize(
    "query",
    ["", "?", "?format=json", "?ID=" + KEY, "?id", "?infohash", "?ids=" + KEY, "?%69%64x=" + KEY],
)
@pytest_twisted.ensureDeferred
async def test_missing_stream_key_is_400(shared, query):
    engine, proxy = shared
    calls = len(engine.engine.getstream_calls)
    answer = await fetch(f"{proxy.url}/ace/getstream{query}")
    assert_error(answer, 400, "missing stream id")
    assert len(engine.engine.getstream_calls) == calls


@pytest.mark.parametrize("param", ["id", "infohash"])
@pytest_twisted.ensureDeferred
async def test_uppercase_and_escaped_keys_are_valid_and_lowercased(engine, proxy_factory, param):
    """
    Hex is hex in either case, and an escaped hex digit is that digit: the
    key is lowercased before the engine or the store sees it.
    """
    proxy = await proxy_factory([engine.config("engine-a")])
    escaped = "".join("%%%02X" % ord(c) for c in OTHER.upper())
    for key, sent in ((KEY, KEY.upper()), (OTHER, escaped)):
        player = await Player.open(f"{proxy.url}/ace/getstream?{param}={sent}")
        assert player.response.code == 200
        await player.wait_bytes(1)
        assert key in proxy.registry.streams
        player.disconnect()
    assert engine.engine.getstream_calls == [(param, KEY), (param, OTHER)]
    assert sorted(s["key"] for s in await proxy.registry.store.list_streams()) == [KEY, OTHER]


# 404 and 400: paths


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/ace",
        "/ace/",
        "/ace/getstream/",
        "/ace/getstream/extra",
        "/ace/getstream/" + KEY,
        "/ace/../streams",
        "/ace/%2e%2e/streams",
        "/%2e%2e/health",
        "/./health",
        "//health",
        "//ace//getstream",
        "/ace//getstream",
        "/streams//" + KEY,
        "/health//",
        "/health/",
        "/HEALTH",
        "/streams/",
        "/streams/" + KEY + "/clients",
        "/engines/x",
        "/ace/r/" + KEY + "/abc",
        "/sim/state",
        "/%00",
        "/index.html",
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404(shared, path):
    engine, proxy = shared
    calls = len(engine.engine.getstream_calls)
    answer = await fetch(proxy.url + path + "?id=" + KEY)
    assert_error(answer, 404)
    assert answer.header("location") == []
    assert len(engine.engine.getstream_calls) == calls


@pytest.mark.parametrize("key", [KEY, KEY.upper()])
@pytest_twisted.ensureDeferred
async def test_unknown_stream_is_404(shared, key):
    _, proxy = shared
    assert_error(await fetch(f"{proxy.url}/streams/{key}"), 404, f"no stream {KEY}")


@pytest.mark.parametrize(
    "key", ["abc", KEY[:39], KEY + "0", "g" * 40, "%ff" * 40, KEY[:20] + "%20" + KEY[21:]]
)
@pytest_twisted.ensureDeferred
async def test_malformed_stream_key_in_path_is_400(shared, key):
    _, proxy = shared
    assert_error(await fetch(f"{proxy.url}/streams/{key}"), 400)
    assert_error(await fetch(f"{proxy.url}/streams/{key}", "DELETE"), 400)


@pytest.mark.parametrize("path", ["/%ff", "/ace/getstream%ff", "/streams/%c3%28", "/%80/health"])
@pytest_twisted.ensureDeferred
async def test_path_that_is_not_utf8_is_400(shared, path):
    _, proxy = shared
    assert_error(await fetch(proxy.url + path), 400, "not valid UTF-8")


@pytest_twisted.ensureDeferred
async def test_host_that_is_not_utf8_is_400(shared):
    _, proxy = shared
    answer = await fetch(proxy.url + "/health", headers={b"Host": b"\xff\xfe"})
    assert_error(answer, 400, "not valid UTF-8")


# 405: methods


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("POST", "/ace/getstream?id=" + KEY, {"GET", "HEAD"}),
        ("PUT", "/ace/getstream?id=" + KEY, {"GET", "HEAD"}),
        ("DELETE", "/ace/getstream?id=" + KEY, {"GET", "HEAD"}),
        ("PATCH", "/ace/getstream", {"GET", "HEAD"}),
        ("OPTIONS", "/ace/getstream?id=" + KEY, {"GET", "HEAD"}),
        ("POST", "/health", {"GET", "HEAD"}),
        ("DELETE", "/health", {"GET", "HEAD"}),
        ("POST", "/streams", {"GET", "HEAD"}),
        ("DELETE", "/streams", {"GET", "HEAD"}),
        ("PUT", "/engines", {"GET", "HEAD"}),
        ("POST", "/streams/" + KEY, {"GET", "HEAD", "DELETE"}),
        ("PUT", "/streams/junk", {"GET", "HEAD", "DELETE"}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(shared, method, path, allowed):
    engine, proxy = shared
    calls = len(engine.engine.getstream_calls)
    answer = await fetch(proxy.url + path, method)
    assert_error(answer, 405)
    [allow] = answer.header("allow")
    assert {m.strip() for m in allow.split(",")} == allowed
    assert len(engine.engine.getstream_calls) == calls


# 503: no engine


@pytest_twisted.ensureDeferred
async def test_no_healthy_engine_is_503(proxy_factory):
    sick = start_engine(faults={"version_fail"})
    try:
        proxy = await proxy_factory([sick.config("sick")])
        answers = await gatherResults(
            [Deferred.fromCoroutine(fetch(proxy.stream_url(KEY))) for _ in range(3)]
        )
        for answer in answers:
            assert_error(
                answer, 503, "no healthy engine: engine sick answered get_version with HTTP 500"
            )
            assert answer.header("retry-after") == ["5"]
        assert sick.engine.getstream_calls == []
        assert proxy.registry.streams == {}
        assert await proxy.registry.store.list_streams() == []
        health = await fetch(proxy.url + "/health")
        assert health.code == 503
        assert health.json()["status"] == "degraded"
        assert health.json()["engines_healthy"] == 0
        assert health.json()["reason"] == (
            "no healthy engine: engine sick answered get_version with HTTP 500"
        )
    finally:
        await sick.stop()


# 502 and 504: the engine fails the start


@attrs.define
class Opened:
    """The engine sessions the simulated engine opened during a test."""

    sessions: list = attrs.field(factory=list)


@pytest.fixture
def opened(monkeypatch):
    record = Opened()
    original = SimulatedEngine.open_session

    def open_session(self, *args, **kwargs):
        session = original(self, *args, **kwargs)
        record.sessions.append(session)
        return session

    monkeypatch.setattr(SimulatedEngine, "open_session", open_session)
    return record


ENGINE_FAULTS = [
    # fault, status, message, whether the engine opened a session
    ("getstream_error", 502, "refused the stream: simulated engine error", False),
    ("getstream_500", 502, "answered getstream with HTTP 500", False),
    ("getstream_garbage", 502, "answered getstream with something not JSON", False),
    ("getstream_wrong_shape", 502, "gave no playback_url", False),
    ("getstream_hang", 504, "did not answer getstream in time", False),
    ("playback_500", 502, "answered playback with HTTP 500", True),
    ("playback_not_ts", 504, "sent no data in time", True),
    ("foreign_playback", 502, "outside its own host and port", True),
]

#: Short enough for a quick test, long enough for a local engine's answer.
FAST = {"engine_timeout": 0.5, "first_byte_timeout": 0.5}


@pytest.mark.parametrize("fault, status, message, engine_session", ENGINE_FAULTS)
@pytest_twisted.ensureDeferred
async def test_engine_fault_fails_the_start(
    engine, proxy_factory, opened, fault, status, message, engine_session
):
    proxy = await watched(proxy_factory, [engine.config("engine-a")], **FAST)
    engine.engine.faults.add(fault)
    error = assert_error(await fetch(proxy.stream_url(KEY)), status, message)
    assert error.startswith("engine engine-a ")
    assert engine.engine.getstream_calls == [("id", KEY)]

    await no_stream_left(proxy)
    assert len(opened.sessions) == (1 if engine_session else 0)
    assert engine.engine.stopped == [s.session_id for s in opened.sessions]
    assert engine.engine.sessions == {}
    assert engine.engine.playback_connections == 0

    # The failure is not remembered: once the engine is well, the stream plays.
    engine.engine.faults.clear()
    player = await Player.open(proxy.stream_url(KEY))
    assert player.response.code == 200
    await player.wait_bytes(1)
    player.disconnect()


@pytest.fixture
def trap(engine):
    """
    A web server on the foreign host at the engine's port, which must never
    be asked anything.
    """
    seen = []

    class Trap(Resource):
        isLeaf = True

        def render(self, request):
            seen.append(request.uri)
            return b"trap"

    try:
        port = reactor.listenTCP(
            engine.port.getHost().port, Site(Trap()), interface=FOREIGN_HOST
        )
    except Exception as e:
        pytest.skip(f"cannot listen on {FOREIGN_HOST}: {e}")
    yield seen
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_foreign_playback_url_is_never_fetched(engine, proxy_factory, opened, trap):
    proxy = await watched(proxy_factory, [engine.config("engine-a")], **FAST)
    engine.engine.faults.add("foreign_playback")
    answer = await fetch(proxy.stream_url(KEY))
    assert_error(answer, 502, "gave a playback_url outside its own host and port")
    [session] = opened.sessions
    # The unusable session was stopped (at the engine's own address) before
    # the start failed.
    assert engine.engine.stopped == [session.session_id]
    assert session.bytes_sent == 0
    assert engine.engine.playback_connections == 0
    assert trap == []
    await no_stream_left(proxy)


@pytest.mark.parametrize(
    "fault, status, message",
    [
        ("getstream_hang", 504, "did not answer getstream in time"),
        ("playback_not_ts", 504, "sent no data in time"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_players_of_one_failed_start_get_the_same_error(
    engine, proxy_factory, fault, status, message
):
    proxy = await watched(
        proxy_factory, [engine.config("engine-a")], engine_timeout=1, first_byte_timeout=1
    )
    engine.engine.faults.add(fault)
    answers = await gatherResults(
        [Deferred.fromCoroutine(fetch(proxy.stream_url(KEY))) for _ in range(3)]
    )
    errors = {assert_error(answer, status, message) for answer in answers}
    assert len(errors) == 1
    assert engine.engine.getstream_calls == [("id", KEY)]
    await no_stream_left(proxy)
    assert engine.engine.sessions == {}


# 401: the admin token


@pytest_twisted.ensureDeferred
async def test_delete_needs_the_admin_token(engine, proxy_factory):
    proxy = await watched(proxy_factory, [engine.config("engine-a")], admin_token=TOKEN)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(1)
    url = f"{proxy.url}/streams/{KEY}"
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer " + TOKEN[:-1]},
        {"Authorization": "Bearer " + TOKEN + "x"},
        {"Authorization": "bearer " + TOKEN},
        {"Authorization": "Basic " + TOKEN},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer \xe9" + TOKEN},
    ):
        answer = await fetch(url, "DELETE", headers)
        assert_error(answer, 401, "admin token")
        assert answer.header("www-authenticate") == ["Bearer"]
    assert KEY in proxy.registry.streams
    # Without the token nothing else is looked at, not even the key.
    assert_error(await fetch(f"{proxy.url}/streams/junk", "DELETE"), 401)

    good = {"Authorization": "Bearer " + TOKEN}
    assert_error(await fetch(f"{proxy.url}/streams/junk", "DELETE", good), 400)
    assert_error(await fetch(f"{proxy.url}/streams/{OTHER}", "DELETE", good), 404)
    answer = await fetch(url, "DELETE", good)
    assert answer.code == 200
    assert answer.json() == {"stopped": KEY}
    assert await player.ended is True
    await no_stream_left(proxy)


# Fuzzing


def _quoted(text: str) -> str:
    return quote(text, safe="")


def _printable(exclude: str) -> st.SearchStrategy:
    """Characters a request target may hold as they are."""
    return st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=exclude)


_hex_key = st.one_of(
    st.sampled_from(HASHES[:3]),
    st.sampled_from(HASHES[:3]).map(str.upper),
    st.text("0123456789abcdefABCDEF", min_size=38, max_size=42),
)
_value = st.one_of(
    _hex_key,
    _hex_key.map(lambda k: "".join("%%%02x" % ord(c) for c in k)),
    st.text(max_size=50).map(_quoted),
    st.text(_printable("#"), max_size=50),
)
_name = st.one_of(
    st.sampled_from(
        ["id", "infohash", "ID", "Id", "format", "%69d", "%69nfohash", "id%20", "id+", "id[]"]
    ),
    st.text(max_size=10).map(_quoted),
)
_pair = st.one_of(
    st.tuples(_name, _value).map(lambda p: f"{p[0]}={p[1]}"),
    _name,
    st.text(_printable("#"), max_size=20),
)
_query = st.tuples(
    st.lists(_pair, max_size=5), st.sampled_from(["&", ";", "&&"])
).map(lambda parts: parts[1].join(parts[0]))


def _expect_stream(query: str) -> bool:
    """
    Whether the query names exactly one stream key, once, as 40 hex digits.
    """
    args = parse_qs(query.encode("ascii"), 1)
    given = [args[name] for name in (b"id", b"infohash") if name in args]
    if len(given) != 1 or len(given[0]) != 1:
        return False
    value = given[0][0]
    return len(value) == 40 and all(c in b"0123456789abcdefABCDEF" for c in value)


# pytest-twisted runs each example of an asynchronous hypothesis test in the
# reactor and waits for it (blockon cannot be used there: a test runs in the
# reactor's own greenlet).


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(query=_query)
@pytest_twisted.ensureDeferred
async def test_fuzzed_getstream_query(shared, query):
    engine, proxy = shared
    answer = await fetch(f"{proxy.url}/ace/getstream?{query}")
    hypothesis.event(f"HTTP {answer.code}")
    if _expect_stream(query):
        assert answer.code == 200, (answer.code, answer.body)
        assert answer.body is None
    else:
        assert_error(answer, 400)
    health = await fetch(proxy.url + "/health")
    assert health.code == 200


_segment = st.one_of(
    st.sampled_from(
        ["", ".", "..", "ace", "getstream", "streams", "health", "engines", KEY, KEY.upper()]
        + ["%2F", "%2e%2e", "%ff", "%c3%28", "%00", "%20"]
    ),
    st.text(max_size=12).map(_quoted),
    st.text(_printable("#?"), max_size=12),
)


def _routed_path(path: str) -> str:
    """The path as the router sees it: each segment unescaped."""
    segments = [unquote_to_bytes(s) for s in path[1:].split("/")]
    return "/" + b"/".join(segments).decode("utf-8", "replace")


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    segments=st.lists(_segment, min_size=1, max_size=5),
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
)
@pytest_twisted.ensureDeferred
async def test_fuzzed_paths(shared, segments, method):
    engine, proxy = shared
    path = "/" + "/".join(segments)
    answer = await fetch(proxy.url + path, method)
    hypothesis.event(f"HTTP {answer.code}")
    assert answer.code in {200, 400, 404, 405}, (path, answer.code, answer.body)
    routed = _routed_path(path)
    # The router reads escaped leading slashes as one ("/%2F" is "/").
    page = "/" + routed.lstrip("/")
    if answer.code == 200 and page in PAGE_ROUTES:
        [kind] = answer.header("content-type")
        assert kind.startswith(PAGE_ROUTES[page]), (path, kind)
        return
    assert answer.header("content-type") == ["application/json"], (path, answer.body)
    if answer.code == 200:
        assert routed in ROUTES or routed.startswith("/streams/"), path
    else:
        assert_error(answer, answer.code)
    if answer.code == 405:
        assert answer.header("allow")


@pytest_twisted.ensureDeferred
async def test_still_serving_after_fuzzing(shared):
    """
    Runs after the fuzzing tests: the daemon answers, and the streams the
    fuzzing started are gone once their players are.
    """
    engine, proxy = shared
    health = await fetch(proxy.url + "/health")
    assert health.code == 200
    assert health.json()["status"] == "ok"
    await no_stream_left(proxy)
    assert engine.engine.sessions == {}
    assert engine.engine.playback_connections == 0
