"""
The engine API client (L{acestream_proxy.engine.api}) against the simulated
engine, all in memory: treq's L{StubTreq} carries each request to the
engine's resource, and one L{Clock} drives both the engine's playback
batches and the client's timeouts.  Nothing here waits for a socket or the
wall clock: what a test has not made happen has not happened.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Coroutine

import attrs
import pytest
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from acestream_proxy.engine.api import (
    MAX_ANSWER,
    STOP_TIMEOUT,
    TEXT_LIMIT,
    EngineAPI,
    EngineClient,
    Playback,
    check_url,
    engine_text,
)
from acestream_proxy.engine.registry import Engine
from acestream_proxy.errors import EngineError, EngineTimeout
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing.engine import FOREIGN_HOST, SimulatedEngine, content_tag
from acestream_proxy.testing.synthetic import verify

HASH = "0123456789abcdef0123456789abcdef01234567"
URL = "http://127.0.0.1:6878"
ENGINE = Engine("engine-a", URL, "127.0.0.1", 6878)

#: 1600 packets/s in batches of 1/16 s (exact in binary floating point):
#: every advance of one interval is one batch of exactly PER_BATCH packets.
PPS = 1600
INTERVAL = 1 / 16
PER_BATCH = 100

TIMEOUT = 5.0
FIRST_BYTE_TIMEOUT = 4.0


class Seen(Resource):
    """
    Passes every request on to C{inner}, noting C{(method, host, uri)}: with
    StubTreq every host reaches the same resource, so this is how a test
    tells which host a request was addressed to.
    """

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self.inner = inner
        self.requests: list[tuple[str, str, str]] = []

    def render(self, request: IRequest) -> bytes | int:
        host = (request.getHeader(b"host") or b"").decode()
        self.requests.append((request.method.decode(), host, request.uri.decode()))
        return self.inner.render(request)


@attrs.define
class Bench:
    """An engine API talking to a simulated engine, through memory."""

    clock: Clock
    engine: SimulatedEngine
    seen: Seen
    stub: StubTreq
    api: EngineAPI

    @classmethod
    def make(
        cls,
        resource: IResource | None = None,
        timeout: float = TIMEOUT,
        clock: Clock | None = None,
        wrap: Callable[[SimulatedEngine], IResource] | None = None,
    ) -> Bench:
        """
        A bench on the simulated engine, or on C{resource} for answers the
        engine never gives (its C{engine} then sees no request), or on what
        C{wrap} puts in front of the engine.
        """
        clock = clock or Clock()
        engine = SimulatedEngine(
            clock, bitrate=PPS * PACKET_SIZE * 8, batch_interval=INTERVAL
        )
        front = wrap(engine) if wrap else engine.resource()
        seen = Seen(resource or front)
        stub = StubTreq(seen)
        return cls(clock, engine, seen, stub, EngineAPI(stub, clock, timeout, FIRST_BYTE_TIMEOUT))

    def start(self, call: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        """Run an API call; its Deferred fires once the exchange is done."""
        return Deferred.fromCoroutine(call)

    def run(self, call: Coroutine[Any, Any, Any]) -> Any:
        """Run an API call that completes without time passing; its result."""
        return result(self.start(call))

    def batches(self, count: int) -> None:
        """Let the engine send C{count} batches, and carry them to the client."""
        for _ in range(count):
            self.clock.advance(INTERVAL)
            self.stub.flush()


def result(d: Deferred[Any]) -> Any:
    """
    The outcome of a Deferred that has fired: its result, or its failure
    raised.
    """
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the call has not completed"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def refused(d: Deferred[Any], kind: type[Exception] = EngineError) -> str:
    """
    The message of the error C{d} failed with, which must be exactly of
    C{kind} (an L{EngineTimeout} is not a plain L{EngineError} here).
    """
    with pytest.raises(EngineError) as info:
        result(d)
    assert type(info.value) is kind, info.value
    return info.value.message


class Body(Protocol):
    """Keeps a streamed body and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


# --- getstream -----------------------------------------------------------------


@pytest.mark.parametrize("param", ["infohash", "id"])
def test_getstream_opens_a_session(param: str) -> None:
    bench = Bench.make()
    playback = bench.run(bench.api.getstream(ENGINE, HASH, param))
    (session_id,) = bench.engine.sessions
    path = f"{HASH}/{session_id}"
    assert playback == Playback(
        playback_url=f"{URL}/ace/r/{path}",
        stat_url=f"{URL}/ace/stat/{path}",
        command_url=f"{URL}/ace/cmd/{path}",
        playback_session_id=session_id,
        is_live=1,
    )
    # The content is named as the player named it.
    assert bench.engine.getstream_calls == [(param, HASH)]
    assert bench.engine.sessions[session_id].param == param
    assert bench.seen.requests == [
        ("GET", "127.0.0.1:6878", f"/ace/getstream?format=json&{param}={HASH}")
    ]


@pytest.mark.parametrize(
    "fault, message",
    [
        ("getstream_error", "refused the stream: simulated engine error"),
        ("getstream_500", "answered getstream with HTTP 500"),
        ("getstream_garbage", "answered getstream with something not JSON"),
        ("getstream_wrong_shape", "gave no playback_url"),
    ],
)
def test_getstream_fault_is_an_engine_error(fault: str, message: str) -> None:
    bench = Bench.make()
    bench.engine.faults.add(fault)
    error = refused(bench.start(bench.api.getstream(ENGINE, HASH)))
    assert error == f"engine engine-a {message}"
    assert bench.engine.getstream_calls == [("infohash", HASH)]
    # No session was opened, so none is stopped.
    assert bench.engine.sessions == {}
    assert [method for method, _, _ in bench.seen.requests] == ["GET"]


def test_getstream_hang_times_out() -> None:
    bench = Bench.make()
    bench.engine.faults.add("getstream_hang")
    asking = bench.start(bench.api.getstream(ENGINE, HASH))
    bench.clock.advance(TIMEOUT - 0.01)
    assert not asking.called
    assert bench.engine.getstream_calls == [("infohash", HASH)]
    bench.clock.advance(0.01)
    error = refused(asking, EngineTimeout)
    assert error == "engine engine-a did not answer getstream in time"
    assert bench.engine.sessions == {}


def test_cancelled_getstream_fails_as_an_engine_error() -> None:
    """
    Why a reconnection must check that its stream is stopping: cancelling
    a call to a hung engine (as stopping the stream does) comes back as the
    engine API's own failure, not as a cancellation; the fake engine API of
    the reconnection tests mimics this.
    """
    bench = Bench.make()
    bench.engine.faults.add("getstream_hang")
    asking = bench.start(bench.api.getstream(ENGINE, HASH, "id"))
    assert bench.engine.getstream_calls == [("id", HASH)]
    asking.cancel()
    error = refused(asking)
    assert error == "engine engine-a failed getstream: ResponseNeverReceived"


def test_foreign_playback_is_refused_and_its_session_stopped() -> None:
    """
    Session URLs outside the engine's host and port are never fetched; the
    session the answer opened is stopped at the configured address, not at
    the one the engine gave.
    """
    bench = Bench.make()
    bench.engine.faults.add("foreign_playback")
    error = refused(bench.start(bench.api.getstream(ENGINE, HASH)))
    assert error == (
        "engine engine-a gave a playback_url outside its own host and port"
        " (got 127.0.0.2:6878, expected 127.0.0.1:6878)"
    )
    (session_id,) = bench.engine.stopped
    assert bench.engine.sessions == {}
    assert bench.seen.requests == [
        ("GET", "127.0.0.1:6878", f"/ace/getstream?format=json&infohash={HASH}"),
        ("GET", "127.0.0.1:6878", f"/ace/cmd/{HASH}/{session_id}?method=stop"),
    ]


# --- playback ------------------------------------------------------------------


def test_playback_body_streams_until_stopped() -> None:
    bench = Bench.make()
    playback = bench.run(bench.api.getstream(ENGINE, HASH))
    response = bench.run(bench.api.open_playback(ENGINE, playback))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"video/mp2t"]
    body = Body()
    response.deliverBody(body)
    bench.stub.flush()
    first = len(body.data)
    assert first > 0, "the first batch goes out with the head"

    bench.clock.advance(INTERVAL)
    assert len(body.data) == first, "nothing arrives until carried"
    bench.stub.flush()
    assert len(body.data) > first
    bench.batches(7)
    report = verify(body.data, content_tag=content_tag(HASH))
    assert report.ok and not report.gaps, report.describe()
    assert report.data_packets == 1 + 8 * PER_BATCH
    assert report.last_seq == bench.engine.current_seq()

    assert bench.run(bench.api.stat(ENGINE, playback)) == {
        "status": "dl",
        "peers": 12,
        "speed_down": 500,
        "speed_up": 20,
        "downloaded": len(body.data),
        "uploaded": 0,
    }
    assert bench.run(bench.api.stop(ENGINE, playback)) is None
    bench.stub.flush()
    assert body.reason is not None and body.reason.check(ResponseDone), body.reason
    assert bench.engine.sessions == {}
    assert bench.engine.stopped == [playback.playback_session_id]
    assert bench.engine.playback_connections == 0
    assert bench.seen.requests[-1] == (
        "GET",
        "127.0.0.1:6878",
        f"/ace/cmd/{HASH}/{playback.playback_session_id}?method=stop",
    )


def test_playback_500() -> None:
    bench = Bench.make()
    playback = bench.run(bench.api.getstream(ENGINE, HASH))
    bench.engine.faults.add("playback_500")
    error = refused(bench.start(bench.api.open_playback(ENGINE, playback)))
    assert error == "engine engine-a answered playback with HTTP 500"
    assert bench.engine.playback_connections == 0


def test_playback_head_that_never_comes_times_out() -> None:
    bench = Bench.make(Silent())
    playback = Playback(f"{URL}/r", f"{URL}/s", f"{URL}/c", "id", 1)
    opening = bench.start(bench.api.open_playback(ENGINE, playback))
    bench.clock.advance(FIRST_BYTE_TIMEOUT - 0.01)
    assert not opening.called
    bench.clock.advance(0.01)
    error = refused(opening, EngineTimeout)
    assert error == "engine engine-a did not start playback in time"


def test_foreign_playback_url_is_not_opened() -> None:
    bench = Bench.make()
    foreign = f"http://{FOREIGN_HOST}:6878/ace/r/{HASH}/x"
    playback = Playback(foreign, f"{URL}/s", f"{URL}/c", "x", 1)
    error = refused(bench.start(bench.api.open_playback(ENGINE, playback)))
    assert error == (
        "engine engine-a gave a playback_url outside its own host and port"
        f" (got {FOREIGN_HOST}:6878, expected 127.0.0.1:6878)"
    )
    assert bench.seen.requests == []


# --- stat, stop, version -------------------------------------------------------


def test_stat_of_a_session_the_engine_no_longer_knows_is_empty() -> None:
    bench = Bench.make()
    playback = bench.run(bench.api.getstream(ENGINE, HASH))
    bench.engine.stop_session(playback.playback_session_id)
    assert bench.run(bench.api.stat(ENGINE, playback)) == {}


def test_stop_twice_is_refused_the_second_time() -> None:
    bench = Bench.make()
    playback = bench.run(bench.api.getstream(ENGINE, HASH))
    bench.run(bench.api.stop(ENGINE, playback))
    assert playback.playback_session_id not in bench.engine.sessions
    error = refused(bench.start(bench.api.stop(ENGINE, playback)))
    assert error == "engine engine-a refused stop: unknown session"


def test_stop_waits_no_longer_than_the_stop_timeout() -> None:
    """A stop is sent while the daemon shuts down: a hung engine must not hold it."""
    assert STOP_TIMEOUT < 10
    bench = Bench.make(Silent(), timeout=10)
    playback = Playback(f"{URL}/r", f"{URL}/s", f"{URL}/c", "id", 1)
    stopping = bench.start(bench.api.stop(ENGINE, playback))
    bench.clock.advance(STOP_TIMEOUT - 0.01)
    assert not stopping.called
    bench.clock.advance(0.01)
    assert refused(stopping, EngineTimeout) == "engine engine-a did not answer stop in time"
    assert bench.seen.requests == [("GET", "127.0.0.1:6878", "/c?method=stop")]


def test_version() -> None:
    bench = Bench.make()
    assert bench.run(bench.api.version(ENGINE)) == "3.1.5"
    assert bench.seen.requests == [
        ("GET", "127.0.0.1:6878", "/webui/api/service?method=get_version&format=json")
    ]


def test_version_fail() -> None:
    bench = Bench.make()
    bench.engine.faults.add("version_fail")
    error = refused(bench.start(bench.api.version(ENGINE)))
    assert error == "engine engine-a answered get_version with HTTP 500"


def test_version_hang_times_out() -> None:
    bench = Bench.make(Silent())
    asking = bench.start(bench.api.version(ENGINE))
    bench.clock.advance(TIMEOUT)
    assert refused(asking, EngineTimeout) == "engine engine-a did not answer get_version in time"


# --- the size cap -----------------------------------------------------------------


def padded_version(size: int) -> bytes:
    """A valid C{get_version} answer of exactly C{size} bytes (JSON allows the padding)."""
    answer = json.dumps({"result": {"version": "3.1.5"}, "error": None}).encode()
    return answer + b" " * (size - len(answer))


def test_answer_of_max_size_is_read() -> None:
    bench = Bench.make(Fixed(padded_version(MAX_ANSWER)))
    assert bench.run(bench.api.version(ENGINE)) == "3.1.5"


def test_answer_over_max_size_is_refused() -> None:
    bench = Bench.make(Fixed(padded_version(MAX_ANSWER + 1)))
    assert refused(bench.start(bench.api.version(ENGINE))) == "engine answer too large"


def test_endless_answer_is_cut_off() -> None:
    """
    An engine that never stops answering: the client stops reading past
    the cap, and closes the connection instead of buffering without end.
    """
    clock = Clock()
    endless = Endless(clock)
    bench = Bench.make(endless, clock=clock)
    asking = bench.start(bench.api.version(ENGINE))
    for _ in range(100):
        if asking.called:
            break
        bench.clock.advance(Endless.TICK)
        bench.stub.flush()
    assert refused(asking) == "engine answer too large"
    assert endless.written <= MAX_ANSWER + 2 * Endless.CHUNK
    assert endless.gone
    bench.clock.advance(Endless.TICK)
    assert not endless.writing.running


# --- check_url ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"{URL}/ace/r/x",
        "https://127.0.0.1:6878/ace/r/x",
        "HTTP://127.0.0.1:6878/ace/r/x",
        "http://127.0.0.1:6878",
    ],
)
def test_check_url_accepts_the_engines_own_address(url: str) -> None:
    assert check_url(ENGINE, url, "playback_url") == url


def test_check_url_takes_the_default_port_of_the_scheme() -> None:
    engine = Engine("engine-b", "http://127.0.0.1", "127.0.0.1", 80)
    assert check_url(engine, "http://127.0.0.1/x", "stat_url") == "http://127.0.0.1/x"
    with pytest.raises(EngineError, match="outside its own host and port"):
        check_url(engine, "https://127.0.0.1/x", "stat_url")


@pytest.mark.parametrize(
    "url, got",
    [
        (f"http://{FOREIGN_HOST}:6878/ace/r/x", f"{FOREIGN_HOST}:6878"),
        ("http://127.0.0.1:6879/ace/r/x", "127.0.0.1:6879"),
        ("http://127.0.0.1/ace/r/x", "127.0.0.1:80"),
        ("ftp://127.0.0.1:6878/ace/r/x", "ftp://127.0.0.1:6878"),
        ("http://127.0.0.1:99999/ace/r/x", "127.0.0.1"),
        ("http://127.0.0.1:6878@evil.test:6878/ace/r/x", "evil.test:6878 with userinfo"),
        ("/ace/r/x", "(no scheme)://(no host)"),
    ],
)
def test_check_url_refuses_other_addresses(url: str, got: str) -> None:
    """
    The error says which address the engine gave, so that an operator sees
    what the engine believes its address is (a container's name, say).
    """
    with pytest.raises(EngineError) as info:
        check_url(ENGINE, url, "playback_url")
    assert info.value.message == (
        "engine engine-a gave a playback_url outside its own host and port"
        f" (got {got}, expected 127.0.0.1:6878)"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://evil@127.0.0.1:6878/ace/r/x",
        "http://evil:secret@127.0.0.1:6878/ace/r/x",
        "http://:secret@127.0.0.1:6878/ace/r/x",
        "http://@127.0.0.1:6878/ace/r/x",
        "https://evil@127.0.0.1:6878/ace/r/x",
    ],
)
def test_check_url_refuses_userinfo_like_a_foreign_host(url: str) -> None:
    """
    The host and port are the engine's, but userinfo is no part of an
    engine's URL: it would be sent as credentials, or hide the real host
    from whoever reads the URL.
    """
    with pytest.raises(EngineError) as info:
        check_url(ENGINE, url, "playback_url")
    assert info.value.message == (
        "engine engine-a gave a playback_url outside its own host and port"
        " (got 127.0.0.1:6878 with userinfo, expected 127.0.0.1:6878)"
    )
    assert "evil" not in info.value.message and "secret" not in info.value.message


class WithUserinfo(Resource):
    """
    The simulated engine, except that C{getstream} opens a session whose
    C{which} URL carries C{evil@} before the engine's own host and port.
    """

    isLeaf = True
    which = "playback_url"

    def __init__(self, engine: SimulatedEngine) -> None:
        super().__init__()
        self.engine = engine
        self.inner = engine.resource()

    def render(self, request: IRequest) -> bytes | int:
        if not request.path.startswith(b"/ace/getstream"):
            return self.inner.render(request)
        session = self.engine.open_session(HASH)
        path = f"{HASH}/{session.session_id}"
        urls = {
            "playback_url": f"{URL}/ace/r/{path}",
            "stat_url": f"{URL}/ace/stat/{path}",
            "command_url": f"{URL}/ace/cmd/{path}",
        }
        urls[self.which] = urls[self.which].replace("http://", "http://evil@", 1)
        response = dict(urls, playback_session_id=session.session_id, is_live=1)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"response": response, "error": None}).encode()


@pytest.mark.parametrize("which", ["playback_url", "stat_url", "command_url"])
def test_getstream_with_userinfo_is_refused_and_its_session_stopped(which: str) -> None:
    bench = Bench.make(wrap=WithUserinfo)
    bench.seen.inner.which = which
    error = refused(bench.start(bench.api.getstream(ENGINE, HASH)))
    assert error == (
        f"engine engine-a gave a {which} outside its own host and port"
        " (got 127.0.0.1:6878 with userinfo, expected 127.0.0.1:6878)"
    )
    (session_id,) = bench.engine.stopped
    assert bench.engine.sessions == {}
    assert bench.seen.requests == [
        ("GET", "127.0.0.1:6878", f"/ace/getstream?format=json&infohash={HASH}"),
        ("GET", "127.0.0.1:6878", f"/ace/cmd/{HASH}/{session_id}?method=stop"),
    ]


@pytest.mark.parametrize("url", [None, "", 42, ["http://127.0.0.1:6878/"]])
def test_check_url_refuses_what_is_not_a_url(url: object) -> None:
    with pytest.raises(EngineError) as info:
        check_url(ENGINE, url, "command_url")
    assert info.value.message == "engine engine-a gave no command_url"


# --- redirects -----------------------------------------------------------------------

#: Where a redirecting engine points: a service the proxy must never contact.
INTERNAL_HOST = "10.0.0.9:8080"
INTERNAL_URL = f"http://{INTERNAL_HOST}/internal"


class Redirecting(Resource):
    """
    The simulated engine, except that paths starting with C{prefix} answer
    C{code} towards L{INTERNAL_URL}.  With StubTreq the internal host would
    reach this resource too: it answers as an engine would, so that only
    the host seen tells that the redirect was followed.
    """

    isLeaf = True

    def __init__(self, engine: SimulatedEngine) -> None:
        super().__init__()
        self.inner = engine.resource()
        self.prefix: str | None = None
        self.code = 302

    def render(self, request: IRequest) -> bytes | int:
        if request.getHeader(b"host") == INTERNAL_HOST.encode():
            request.setHeader(b"Content-Type", b"application/json")
            answer = {"response": {}, "result": {"version": "internal"}, "error": None}
            return json.dumps(answer).encode()
        if self.prefix is not None and request.path.decode().startswith(self.prefix):
            request.setResponseCode(self.code)
            request.setHeader(b"Location", INTERNAL_URL.encode())
            return b"moved"
        return self.inner.render(request)


def redirecting_bench() -> tuple[Bench, Redirecting]:
    bench = Bench.make(wrap=Redirecting)
    return bench, bench.seen.inner


REDIRECTED_CALLS = [
    ("/ace/getstream", "getstream", lambda api, playback: api.getstream(ENGINE, HASH)),
    ("/ace/r/", "playback", lambda api, playback: api.open_playback(ENGINE, playback)),
    ("/ace/stat/", "stat", lambda api, playback: api.stat(ENGINE, playback)),
    ("/ace/cmd/", "stop", lambda api, playback: api.stop(ENGINE, playback)),
    ("/webui/api/service", "get_version", lambda api, playback: api.version(ENGINE)),
]


@pytest.mark.parametrize(
    "prefix, what, call", REDIRECTED_CALLS, ids=[what for _, what, _ in REDIRECTED_CALLS]
)
def test_no_engine_call_follows_a_redirect(prefix: str, what: str, call) -> None:
    bench, front = redirecting_bench()
    playback = bench.run(bench.api.getstream(ENGINE, HASH))
    front.prefix = prefix
    del bench.seen.requests[:]

    error = refused(bench.start(call(bench.api, playback)))
    assert error == f"engine engine-a answered {what} with a redirect (HTTP 302), not followed"
    [(method, host, uri)] = bench.seen.requests
    assert (method, host) == ("GET", "127.0.0.1:6878") and uri.startswith(prefix)
    assert bench.engine.playback_connections == 0


@pytest.mark.parametrize("code", [300, 301, 302, 303, 304, 307, 308])
def test_every_redirect_status_is_an_engine_error(code: int) -> None:
    bench, front = redirecting_bench()
    front.prefix, front.code = "/ace/getstream", code
    error = refused(bench.start(bench.api.getstream(ENGINE, HASH)))
    assert error == (
        f"engine engine-a answered getstream with a redirect (HTTP {code}), not followed"
    )
    assert [host for _, host, _ in bench.seen.requests] == ["127.0.0.1:6878"]


def test_redirected_stop_of_an_unusable_answer_is_not_followed() -> None:
    bench, front = redirecting_bench()
    bench.engine.faults.add("foreign_playback")
    front.prefix = "/ace/cmd/"
    error = refused(bench.start(bench.api.getstream(ENGINE, HASH)))
    assert error == (
        "engine engine-a gave a playback_url outside its own host and port"
        " (got 127.0.0.2:6878, expected 127.0.0.1:6878)"
    )
    assert [host for _, host, _ in bench.seen.requests] == ["127.0.0.1:6878"] * 2
    assert bench.seen.requests[1][2].startswith("/ace/cmd/")


def test_engine_client_never_follows_even_when_asked() -> None:
    """
    The daemon's client refuses to follow on its own, whatever a caller
    passes: a call that forgets C{allow_redirects=False} still stays put.
    """
    clock = Clock()
    engine = SimulatedEngine(clock)
    front = Redirecting(engine)
    front.prefix = "/"
    seen = Seen(front)
    agent = RequestTraversalAgent(seen)
    client = EngineClient(agent)
    answering = client.get(f"{URL}/anything", allow_redirects=True)
    agent.flush()
    assert result(answering).code == 302
    assert [host for _, host, _ in seen.requests] == ["127.0.0.1:6878"]


# --- the engine's own text -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("simulated engine error", "simulated engine error"),
        ("line1\nline2\r\tend", r"line1\nline2\r\tend"),
        ("red \x1b[31m bell \x07 nul \x00 del \x7f", r"red \x1b[31m bell \x07 nul \x00 del \x7f"),
        ("nel \x85 ls \u2028 ps \u2029", r"nel \x85 ls \u2028 ps \u2029"),
        ("bidi \u202e zwsp \u200b bom \ufeff", r"bidi \u202e zwsp \u200b bom \ufeff"),
        ("lone \ud800 surrogate", r"lone \ud800 surrogate"),
        ("private \U000f0000 use", r"private \U000f0000 use"),
        ("a \\n is not a line break", r"a \\n is not a line break"),
        ("café, 日本, ♫", "café, 日本, ♫"),
        (404, "404"),
        ({"code": 1}, "{'code': 1}"),
    ],
)
def test_engine_text_is_one_line_with_controls_escaped(text: object, shown: str) -> None:
    assert engine_text(text) == shown


def test_engine_text_is_capped() -> None:
    assert engine_text("x" * TEXT_LIMIT) == "x" * TEXT_LIMIT
    assert engine_text("x" * 5000) == "x" * TEXT_LIMIT + "..."


def test_engine_text_cap_never_cuts_an_escape() -> None:
    assert engine_text("x" * (TEXT_LIMIT - 1) + "\n") == "x" * (TEXT_LIMIT - 1) + "..."
    assert engine_text("x" * (TEXT_LIMIT - 2) + "\n") == "x" * (TEXT_LIMIT - 2) + r"\n"


#: An engine's error text with a line break, a terminal escape and no end.
NASTY = "line1\nline2\x1b[31m" + "x" * 5000
NASTY_SHOWN = engine_text(NASTY)


def test_getstream_error_text_is_shown_as_one_capped_line() -> None:
    bench = Bench.make(Fixed(json.dumps({"response": None, "error": NASTY}).encode()))
    error = refused(bench.start(bench.api.getstream(ENGINE, HASH)))
    assert error == f"engine engine-a refused the stream: {NASTY_SHOWN}"
    assert NASTY_SHOWN.startswith(r"line1\nline2\x1b[31mxxx") and NASTY_SHOWN.endswith("x...")


def test_stop_error_text_is_shown_as_one_capped_line() -> None:
    bench = Bench.make(Fixed(json.dumps({"response": None, "error": NASTY}).encode()))
    playback = Playback(f"{URL}/r", f"{URL}/s", f"{URL}/c", "id", 1)
    error = refused(bench.start(bench.api.stop(ENGINE, playback)))
    assert error == f"engine engine-a refused stop: {NASTY_SHOWN}"
    assert "\n" not in error and "\x1b" not in error and len(error) < TEXT_LIMIT + 50


def test_playback_session_id_is_shown_as_one_capped_line() -> None:
    """The session id goes to the log and to C{/streams}: the engine's text, tamed."""
    answer = {
        "response": {
            "playback_url": f"{URL}/r",
            "stat_url": f"{URL}/s",
            "command_url": f"{URL}/c",
            "playback_session_id": NASTY,
            "is_live": 1,
        },
        "error": None,
    }
    bench = Bench.make(Fixed(json.dumps(answer).encode()))
    playback = bench.run(bench.api.getstream(ENGINE, HASH))
    assert playback.playback_session_id == NASTY_SHOWN
    assert len(NASTY_SHOWN) == TEXT_LIMIT + len("...")


# --- answers the simulated engine never gives ----------------------------------------


class Silent(Resource):
    """An engine that takes every request and never answers."""

    isLeaf = True

    def render(self, request: IRequest) -> int:
        return NOT_DONE_YET


class Fixed(Resource):
    """An engine that answers every request with the same JSON body."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


class Endless(Resource):
    """
    An engine that answers with a body that never ends: a chunk of JSON
    whitespace every C{TICK} seconds of C{clock}, well within the timeout.
    """

    isLeaf = True
    CHUNK = 4096
    TICK = 0.1

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.written = 0
        self.gone = False
        self.writing: LoopingCall | None = None

    def render(self, request: IRequest) -> int:
        self.writing = LoopingCall(self._write, request)
        self.writing.clock = self.clock
        self.writing.start(self.TICK, now=True)
        request.notifyFinish().addBoth(self._gone)
        return NOT_DONE_YET

    def _write(self, request: IRequest) -> None:
        request.write(b" " * self.CHUNK)
        self.written += self.CHUNK

    def _gone(self, result: object) -> None:
        self.gone = True
        self.writing.stop()
