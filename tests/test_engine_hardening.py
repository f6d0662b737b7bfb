"""
Engines are reached only at their configured host and port, through real
sockets on 127.0.0.1: an engine that answers a redirect (towards an
"internal service" of the proxy's network, which records every request it
gets) leads the proxy nowhere, an engine URL with userinfo is refused as a
foreign one, and an engine's own error text reaches a player's error and
the log as one short line.

The engine is the simulated one behind a L{Front} that answers chosen paths
itself: with a 302, or with a body the simulated engine never gives.
"""

import json
from typing import Callable

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from acestream_proxy.engine.api import TEXT_LIMIT, EngineClient
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing.engine import SimulatedEngine

from .conftest import BITRATE
from .support import HASHES, Player, RunningEngine, check_whole_packets, eventually

KEY = HASHES[0]

#: What the internal service holds; no engine answer may bring it to a player.
SECRET = "internal-service-secret"

#: The internal service's "video": whole TS packets, which a proxy that
#: followed the redirect would relay to its players as they are.
SECRET_PACKETS = (b"\x47" + SECRET.encode().ljust(PACKET_SIZE - 1, b".")) * 2000

#: An engine's error text with a line break, a terminal escape and no end.
NASTY = "line1\nline2\x1b[31m" + "x" * 5000

#: Timeouts long enough for a loaded machine, short enough for a quick test.
TIMEOUTS = {"engine_timeout": 2, "first_byte_timeout": 2}

#: A stream ends soon after its last player leaves.
QUICK_CLEANUP = {"cleanup_grace": 0.2, "heartbeat_interval": 0.2}


# --- the internal service and the engine's front ---------------------------------


class _Recording(Resource):
    """
    Notes every request, then answers JSON naming the secret (as an engine
    error would carry it), or the secret packets under C{/ts}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[bytes] = []

    def render(self, request: IRequest) -> bytes:
        self.requests.append(request.uri)
        if request.path.startswith(b"/ts"):
            request.setHeader(b"Content-Type", b"video/mp2t")
            return SECRET_PACKETS
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"response": None, "error": SECRET, "result": None}).encode()


@attrs.define
class Internal:
    """A service on the proxy's network that no engine may lead it to."""

    resource: _Recording
    port: object

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"

    @property
    def requests(self) -> list[bytes]:
        return self.resource.requests


class Front(Resource):
    """
    The simulated engine, except for the paths starting with a prefix in
    C{answers}: those are answered by its function instead.  C{requests}
    notes C{(uri, authorization header)} of everything that reached it.
    """

    isLeaf = True

    def __init__(self, engine: SimulatedEngine) -> None:
        super().__init__()
        self.engine = engine
        self.inner: IResource = engine.resource()
        self.answers: dict[str, Callable[[IRequest], bytes]] = {}
        self.requests: list[tuple[str, bytes | None]] = []

    def render(self, request: IRequest) -> bytes | int:
        path = request.path.decode("latin-1")
        self.requests.append((request.uri.decode("latin-1"), request.getHeader(b"authorization")))
        for prefix, answer in self.answers.items():
            if path.startswith(prefix):
                return answer(request)
        return self.inner.render(request)

    def redirect(self, prefix: str, location: str) -> None:
        def moved(request: IRequest) -> bytes:
            request.setResponseCode(302)
            request.setHeader(b"Location", location.encode())
            request.setHeader(b"Content-Type", b"text/plain")
            return SECRET.encode()

        self.answers[prefix] = moved

    def answer_json(self, prefix: str, body: dict) -> None:
        def answer(request: IRequest) -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(body).encode()

        self.answers[prefix] = answer


@pytest.fixture
def internal():
    resource = _Recording()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield Internal(resource, port)
    pytest_twisted.blockon(port.stopListening())


@attrs.define
class FrontedEngine(RunningEngine):
    """A running simulated engine, and the L{Front} it is served behind."""

    front: Front


@pytest.fixture
def front():
    engine = SimulatedEngine(reactor, bitrate=BITRATE)
    resource = Front(engine)
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    running = FrontedEngine(engine, port, resource)
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def log_events():
    """Every log event emitted during the test."""
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def logged(events: list[dict], fragment: str) -> list[str]:
    """The formatted text of every event whose format contains C{fragment}."""
    return [formatEvent(e) for e in events if fragment in (e.get("log_format") or "")]


async def fetch_error(url: str) -> tuple[int, str]:
    """
    The status and the JSON C{error} of a request that must fail; a stream
    that plays instead is left at once, its endless body unread.
    """
    player = await Player.open(url)
    if player.response.code == 200:
        try:
            await player.wait_bytes(PACKET_SIZE, timeout=2)
        finally:
            player.disconnect()
        raise AssertionError(f"the stream played: {bytes(player.data[:PACKET_SIZE])!r}")
    assert player.response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return player.response.code, (await player.json())["error"]


async def no_stream_left(proxy) -> None:
    await eventually(lambda: not proxy.registry.streams, what="the stream to be forgotten")


# --- redirects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, what, target",
    [("/ace/getstream", "getstream", "/json"), ("/ace/r/", "playback", "/ts")],
)
@pytest_twisted.ensureDeferred
async def test_redirect_at_start_is_a_502_and_not_followed(
    front, internal, proxy_factory, prefix, what, target
):
    """
    A getstream or a playback URL that redirects towards the internal
    service fails the start; the internal service never hears of it, and
    nothing of its text reaches the player.
    """
    proxy = await proxy_factory([front.config("engine-a")], **TIMEOUTS)
    front.front.redirect(prefix, internal.url(target))

    status, error = await fetch_error(proxy.stream_url(KEY))
    assert status == 502
    assert error == f"engine engine-a answered {what} with a redirect (HTTP 302), not followed"
    assert SECRET not in error and internal.url("") not in error
    assert internal.requests == []

    if what == "playback":
        # The session the engine opened is stopped.
        assert front.engine.getstream_calls == [("id", KEY)]
        await eventually(lambda: len(front.engine.stopped) == 1, what="the session's stop")
    else:
        assert front.engine.getstream_calls == []
        assert front.engine.stopped == []
    assert front.engine.sessions == {}
    assert front.engine.playback_connections == 0
    await no_stream_left(proxy)


@pytest_twisted.ensureDeferred
async def test_redirect_mid_stream_is_a_reconnection(
    front, internal, proxy_factory, log_events
):
    """
    A playback connection that ends while the engine now redirects its
    playback URLs: the reconnection attempt fails on the redirect (the
    player's body never carries the internal service's bytes), and a later
    attempt plays again once the engine is well.
    """
    proxy = await proxy_factory([front.config("engine-a")], **TIMEOUTS)
    player = await Player.open(proxy.stream_url(KEY))
    assert player.response.code == 200
    await player.wait_bytes(100 * PACKET_SIZE)

    front.front.redirect("/ace/r/", internal.url("/ts"))
    assert front.engine.drop_playback() == 1
    await eventually(
        lambda: logged(log_events, "reconnection {n} failed") or internal.requests,
        what="a failed reconnection",
    )
    assert internal.requests == []
    for failure in logged(log_events, "reconnection {n} failed"):
        assert "answered playback with a redirect (HTTP 302), not followed" in failure

    front.front.answers.clear()
    await player.more(500 * PACKET_SIZE)
    await eventually(lambda: logged(log_events, "reconnected on"), what="a reconnection")
    assert internal.requests == []
    assert SECRET.encode() not in player.data
    check_whole_packets(player.data, KEY, allowed_jumps=1)
    assert player.clean_end is None, "the player kept its connection"
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_redirected_stop_is_not_followed(
    front, internal, proxy_factory, log_events
):
    """
    The stop sent when the last player left meets a redirect: the proxy
    logs that the engine did not confirm it, and goes no further.
    """
    proxy = await proxy_factory([front.config("engine-a")], **TIMEOUTS, **QUICK_CLEANUP)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(10 * PACKET_SIZE)
    [session] = front.engine.sessions

    front.front.redirect("/ace/cmd/", internal.url("/json"))
    player.disconnect()
    await eventually(
        lambda: logged(log_events, "did not confirm stop") or internal.requests,
        what="the stop of the stream's session",
    )
    assert internal.requests == []
    [warning] = logged(log_events, "did not confirm stop")
    assert "answered stop with a redirect (HTTP 302), not followed" in warning
    assert SECRET not in warning
    assert any(uri.startswith(f"/ace/cmd/{KEY}/{session}") for uri, _ in front.front.requests)
    await no_stream_left(proxy)


@pytest_twisted.ensureDeferred
async def test_the_services_client_never_follows(front, internal, proxy_factory):
    """
    The HTTP client the daemon builds does not follow a redirect even when
    a caller asks it to: no future call can forget to refuse.
    """
    proxy = await proxy_factory([front.config("engine-a")])
    http = proxy.registry.api.http
    assert isinstance(http, EngineClient)
    front.front.redirect("/elsewhere", internal.url("/json"))
    for follow in (True, False):
        response = await http.get(front.url + "/elsewhere", allow_redirects=follow)
        await response.content()
        assert response.code == 302
    assert internal.requests == []


# --- userinfo ---------------------------------------------------------------------------


def answer_with_userinfo(front: Front, which: str) -> None:
    """
    Make C{getstream} open a real session whose C{which} URL carries
    C{evil@} userinfo before the engine's own host and port.
    """

    def answer(request: IRequest) -> bytes:
        session = front.engine.open_session(KEY, "id")
        host = request.getHeader(b"host").decode()
        path = f"{KEY}/{session.session_id}"
        urls = {
            "playback_url": f"http://{host}/ace/r/{path}",
            "stat_url": f"http://{host}/ace/stat/{path}",
            "command_url": f"http://{host}/ace/cmd/{path}",
        }
        urls[which] = urls[which].replace("http://", "http://evil@", 1)
        request.setHeader(b"Content-Type", b"application/json")
        response = dict(urls, playback_session_id=session.session_id, is_live=1)
        return json.dumps({"response": response, "error": None}).encode()

    front.answers["/ace/getstream"] = answer


@pytest.mark.parametrize("which", ["playback_url", "command_url"])
@pytest_twisted.ensureDeferred
async def test_url_with_userinfo_is_refused_and_its_session_stopped(
    front, proxy_factory, which
):
    proxy = await proxy_factory([front.config("engine-a")], **TIMEOUTS)
    answer_with_userinfo(front.front, which)

    status, error = await fetch_error(proxy.stream_url(KEY))
    assert status == 502
    assert error.startswith(f"engine engine-a gave a {which} outside its own host and port")
    assert " with userinfo, expected 127.0.0.1:" in error and "evil" not in error
    await eventually(lambda: len(front.engine.stopped) == 1, what="the session's stop")
    assert front.engine.sessions == {}
    assert front.engine.playback_connections == 0
    # The stop went to the configured address, and no request carried the
    # userinfo as credentials.
    assert [auth for _, auth in front.front.requests] == [None] * len(front.front.requests)
    assert not any(uri.startswith("/ace/r/") for uri, _ in front.front.requests)
    await no_stream_left(proxy)


# --- the engine's error text ---------------------------------------------------------


def assert_one_short_line(text: str) -> None:
    """
    C{text} ends with the engine's text, escaped on one line and cut at
    L{TEXT_LIMIT} characters.
    """
    assert "\n" not in text and "\r" not in text, text
    assert "\x1b" not in text, text
    shown = text[text.index("line1") :]
    assert shown.startswith("line1\\nline2\\x1b[31mxxx") and shown.endswith("x...")
    assert len(shown) == TEXT_LIMIT + len("...")


@pytest_twisted.ensureDeferred
async def test_getstream_error_text_is_one_capped_escaped_line(
    front, proxy_factory, log_events
):
    """
    A refusal with a line break, a terminal escape and 5000 more characters
    reaches the player's error and the log as one escaped, capped line.
    """
    proxy = await proxy_factory([front.config("engine-a")], **TIMEOUTS)
    front.front.answer_json("/ace/getstream", {"response": None, "error": NASTY})

    status, error = await fetch_error(proxy.stream_url(KEY))
    assert status == 502
    assert error.startswith("engine engine-a refused the stream: line1\\nline2")
    assert_one_short_line(error)
    [event] = logged(log_events, "failed to start")
    assert_one_short_line(event)
    assert not [e for e in log_events if "\x1b" in formatEvent(e)]
    await no_stream_left(proxy)


@pytest_twisted.ensureDeferred
async def test_stop_error_text_is_one_capped_escaped_line(
    front, proxy_factory, log_events
):
    proxy = await proxy_factory([front.config("engine-a")], **TIMEOUTS, **QUICK_CLEANUP)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(10 * PACKET_SIZE)
    front.front.answer_json("/ace/cmd/", {"response": None, "error": NASTY})
    player.disconnect()

    await eventually(lambda: logged(log_events, "did not confirm stop"), what="the stop")
    [event] = logged(log_events, "did not confirm stop")
    assert "refused stop: line1\\nline2" in event
    assert_one_short_line(event)
    assert not [e for e in log_events if "\x1b" in formatEvent(e)]
    await no_stream_left(proxy)
