"""
Engines from an orchestrator (C{engines_url}): the answer's shapes; on a
Clock with treq's StubTreq and a fake orchestrator resource, engines that
appear (used once their probe passes), disappear (no new stream, their
streams fail over) and a broken orchestrator (the last good list kept,
each problem logged once); and through real sockets, a player moved from
an engine the orchestrator withdrew to the other it announced.
"""

import gc
import json

import attrs
import pytest
import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from acestream_proxy.config import Config, Tuning
from acestream_proxy.engine.orchestrator import (
    MAX_ANSWER,
    MAX_ENGINES,
    Announced,
    EventReporter,
    Orchestrator,
    OrchestratorError,
    parse_engines,
)
from acestream_proxy.engine.registry import Engine
from acestream_proxy.http.routes import make_site
from acestream_proxy.service import make_service
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing.synthetic import verify

from .fakes import FakeRequest, make_server, packets
from .support import HASHES, Player, check_whole_packets, eventually, start_engine
from .test_reconnect import FlakyEngineAPI, body

KEY = "ab" * 20
API_KEY = "s3cret-orchestrator-key"


def item(container_id, port, host="127.0.0.1", forwarded=False, **more):
    """
    One engine as acestream-orchestrator's C{GET /engines} lists it.
    """
    return {
        "container_id": container_id,
        "container_name": f"acestream-{container_id}",
        "host": host,
        "port": port,
        "labels": {"orchestrator.managed": "acestream"},
        "forwarded": forwarded,
        "first_seen": "2026-01-01T00:00:00Z",
        "last_seen": "2026-01-01T00:00:10Z",
        "streams": [],
        "health_status": "healthy",
        **more,
    }


# --- the answer's shape -----------------------------------------------------------


def test_parse_a_list_and_the_items_wrapper():
    answer = [item("c1", 19000), item("c2", 19001, host="Engine.LAN", forwarded=True)]
    expected = [
        Announced("c1", "127.0.0.1", 19000, False),
        Announced("c2", "engine.lan", 19001, True),
    ]
    assert parse_engines(json.dumps(answer).encode()) == (expected, [])
    assert parse_engines(json.dumps({"items": answer}).encode()) == (expected, [])
    assert Announced("c3", "::1", 6878).url == "http://[::1]:6878"


@pytest.mark.parametrize(
    "body, why",
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'{"engines": []}', "not a list"),
        (b"42", "not a list"),
        (
            json.dumps([item(f"c{i}", 1000 + i) for i in range(MAX_ENGINES + 1)]).encode(),
            "more than",
        ),
    ],
)
def test_unusable_answers_are_refused_whole(body, why):
    with pytest.raises(OrchestratorError, match=why):
        parse_engines(body)


def test_bad_items_are_left_out_by_position():
    answer = [
        item("ok", 19000),
        "a string",
        item("bad id\nforged line", 19001),
        item("c3", 19002, host="evil@host/path"),
        item("c4", 0),
        item("c5", True),
        item("c6", 19003, forwarded="yes"),
        item("ok", 19004),
    ]
    engines, problems = parse_engines(json.dumps(answer).encode())
    assert engines == [Announced("ok", "127.0.0.1", 19000)]
    assert problems == [
        "item 1: not an object",
        "item 2: no usable container_id",
        "item 3: no usable host",
        "item 4: no usable port",
        "item 5: no usable port",
        "item 6: forwarded is not true or false",
        "item 7: a container_id listed before",
    ]
    assert not any("forged" in p or "evil" in p for p in problems)


# --- the poller on a Clock ------------------------------------------------------------


class FakeOrchestrator(Resource):
    """
    acestream-orchestrator's C{GET /engines} as a test sets it: C{engines}
    in its JSON, or a fault in C{mode}.  Every request is kept.
    """

    isLeaf = True

    def __init__(self, engines=()):
        super().__init__()
        self.engines = list(engines)
        self.mode = None
        self.requests = []
        self.events = []
        self.events_mode = None

    def render_POST(self, request):
        if self.events_mode == "hang":
            return NOT_DONE_YET
        self.events.append(
            (
                request.path.decode(),
                json.loads(request.content.read()),
                request.requestHeaders.getRawHeaders(b"authorization"),
            )
        )
        if self.events_mode == "500":
            request.setResponseCode(500)
        return b"{}"

    def render_GET(self, request):
        self.requests.append(request)
        if self.mode == "hang":
            return NOT_DONE_YET
        if self.mode == "500":
            request.setResponseCode(500)
            return b"internal error"
        if self.mode == "redirect":
            # Elsewhere, a list the proxy must never read.
            request.redirect(b"/other-engines")
            return b""
        if self.mode == "garbage":
            return b"<html>not json</html>"
        if self.mode == "shape":
            return b'{"detail": "Not authenticated"}'
        if self.mode == "huge":
            return b"[" + b" " * MAX_ANSWER + b"]"
        if self.mode == "endless":
            # No length announced: the limit is found while reading.
            for _ in range(MAX_ANSWER // 65536 + 2):
                request.write(b" " * 65536)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.engines).encode()


@attrs.define(eq=False)
class ProbedEngineAPI(FlakyEngineAPI):
    """
    A fake engine API whose version probe of the engines in C{pending}
    waits for the test to answer it (C{probes}).
    """

    pending: set = attrs.field(factory=set)
    probes: dict = attrs.field(factory=dict)

    async def version(self, engine):
        if engine.id in self.pending:
            d = self.probes[engine.id] = Deferred()
            return await d
        return await super().version(engine)


@pytest.fixture
def log_events():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture(autouse=True)
def no_traceback(log_events):
    """
    Whatever the orchestrator answers, nothing logs a traceback, nor leaves
    a failed Deferred unhandled (collected now, so that it shows here).
    """
    yield
    gc.collect()
    assert [e for e in log_events if e.get("log_failure") is not None or e.get("isError")] == []


def logged(events, fragment):
    return [e for e in events if fragment in (e.get("log_format") or "")]


def polling(clock, fake, api=None, http=None, **tuning):
    """
    A proxy on C{clock} with the static C{engine-a} and an orchestrator
    poller asking C{fake} through StubTreq every 10 s.
    """
    api = api or ProbedEngineAPI(clock=clock)
    server = make_server(clock, api, **tuning)
    stub = StubTreq(fake)
    orchestrator = Orchestrator(
        url="http://orchestrator.test:8000/engines",
        http=http or stub,
        clock=clock,
        registry=server.engines,
        streams=lambda: list(server.streams.values()),
        refresh_interval=10,
        timeout=5,
        api_key=API_KEY,
    )
    server.startService()
    orchestrator.startService()
    stub.flush()
    return server, api, orchestrator, stub


def shut(server, *services):
    """
    Stop C{services}, then the streams (their fake players' transports
    have no producer for the registry's shutdown to unregister), then the
    proxy.
    """
    for service in services:
        service.stopService()
    for key in list(server.streams):
        stopped = Deferred.fromCoroutine(server.stop_stream(key, "the test is over"))
        assert stopped.called
    server.stopService()


def ids(server):
    return [engine.id for engine in server.engines.engines]


def test_an_engine_that_appears_is_used_once_its_probe_passes():
    clock = Clock()
    fake = FakeOrchestrator()
    server, api, orchestrator, stub = polling(clock, fake)
    assert ids(server) == ["engine-a"]
    [first] = fake.requests
    assert first.requestHeaders.getRawHeaders(b"authorization") == [f"Bearer {API_KEY}".encode()]
    assert API_KEY not in repr(orchestrator)

    # One stream on engine-a; then c1 appears, forwarded, its probe pending.
    request = FakeRequest()
    attached = Deferred.fromCoroutine(server.attach(KEY, "id", request))
    api.readers[0].dataReceived(packets(0, 10))
    assert attached.called
    api.pending.add("c1")
    fake.engines = [item("c1", 19000, forwarded=True)]
    clock.advance(10)
    stub.flush()
    assert ids(server) == ["engine-a", "c1"]
    c1 = server.engines.by_id("c1")
    assert (c1.url, c1.forwarded, c1.healthy) == ("http://127.0.0.1:19000", True, False)
    # Not usable yet: the loaded engine-a is the only choice.
    assert server.engines.select({"engine-a": 1}) is server.engines.by_id("engine-a")

    api.probes["c1"].callback("3.1.5")
    assert c1.healthy and c1.version == "3.1.5"
    assert server.engines.select({"engine-a": 1}) is c1
    # Asked again, the same list changes nothing.
    clock.advance(10)
    stub.flush()
    assert len(fake.requests) == 3
    assert server.engines.engines[1] is c1

    # Its forwarded flag follows the orchestrator.
    fake.engines = [item("c1", 19000, forwarded=False)]
    clock.advance(10)
    stub.flush()
    assert server.engines.by_id("c1") is c1 and not c1.forwarded
    shut(server, orchestrator)


def test_an_engine_that_disappears_gets_no_stream_and_its_stream_fails_over(log_events):
    clock = Clock()
    fake = FakeOrchestrator([item("c1", 19000, forwarded=True)])
    server, api, orchestrator, stub = polling(clock, fake)
    assert server.engines.by_id("c1").healthy

    # The forwarded c1 wins the tie with engine-a.
    request = FakeRequest()
    attached = Deferred.fromCoroutine(server.attach(KEY, "id", request))
    api.readers[0].dataReceived(packets(0, 50))
    assert attached.called
    session = server.streams[KEY]
    session.source.jitter = lambda: 0.0
    assert session.engine.id == "c1"

    fake.engines = []
    clock.advance(10)
    stub.flush()
    assert ids(server) == ["engine-a"]
    # Moved at once to engine-a; c1's session was told to stop.
    assert [engine for engine, _, _ in api.getstreams] == ["c1", "engine-a"]
    assert api.stops == ["session-1"]
    api.readers[1].dataReceived(packets(500, 20))
    assert session.engine.id == "engine-a"
    meta = server.store.get_stream(KEY).result
    assert (meta["status"], meta["container_id"], meta["reconnects"]) == ("started", "engine-a", 1)
    report = verify(body(request), allowed_jumps=1)
    assert report.ok and report.gaps == [(50, 500)], report.describe()
    assert not request.transport.disconnecting
    assert logged(log_events, "withdrawn")

    # New streams never go to c1 again.
    other = FakeRequest()
    joining = Deferred.fromCoroutine(server.attach("cd" * 20, "id", other))
    assert [engine for engine, _, _ in api.getstreams][-1] == "engine-a"
    shut(server, orchestrator)
    # It never got data: the stop refused it.
    refused = []
    joining.addErrback(refused.append)
    assert "the test is over" in refused[0].getErrorMessage()


def test_an_engine_that_moves_is_replaced():
    clock = Clock()
    fake = FakeOrchestrator([item("c1", 19000)])
    server, api, orchestrator, stub = polling(clock, fake)
    before = server.engines.by_id("c1")
    fake.engines = [item("c1", 19005)]
    clock.advance(10)
    stub.flush()
    after = server.engines.by_id("c1")
    assert after is not before and after.url == "http://127.0.0.1:19005"
    assert not before.healthy
    assert ids(server) == ["engine-a", "c1"]
    shut(server, orchestrator)


def test_a_configured_engine_id_is_not_taken_over():
    clock = Clock()
    fake = FakeOrchestrator([item("engine-a", 19000), item("c1", 19001)])
    server, api, orchestrator, stub = polling(clock, fake)
    assert ids(server) == ["engine-a", "c1"]
    assert server.engines.by_id("engine-a").url == "http://127.0.0.1:6878"
    fake.engines = []
    clock.advance(10)
    stub.flush()
    assert ids(server) == ["engine-a"]
    shut(server, orchestrator)


@pytest.mark.parametrize(
    "mode, why",
    [
        ("500", "HTTP 500"),
        ("redirect", "redirect (HTTP 302), not followed"),
        ("garbage", "not JSON"),
        ("shape", "not a list of engines"),
        ("huge", "larger than"),
        ("endless", "larger than"),
        ("hang", "did not answer within 5s"),
    ],
)
def test_a_broken_orchestrator_keeps_the_last_list_and_is_logged_once(mode, why, log_events):
    clock = Clock()
    fake = FakeOrchestrator([item("c1", 19000)])
    server, api, orchestrator, stub = polling(clock, fake)
    c1 = server.engines.by_id("c1")
    fake.mode = mode
    for _ in range(35):  # asked at 10, 20 and 30; the last timeout at 35
        clock.advance(1)
        stub.flush()
    assert server.engines.by_id("c1") is c1 and c1.healthy
    [warning] = logged(log_events, "engine list unusable")
    assert why in warning["why"]
    assert warning["n"] == 1
    assert len(fake.requests) == 4
    assert not any(f.get("log_failure") for f in log_events)

    # Usable again: said once, and its changes apply.
    fake.mode = None
    fake.engines = [item("c2", 19001)]
    clock.advance(10)
    stub.flush()
    assert ids(server) == ["engine-a", "c2"]
    assert len(logged(log_events, "usable again")) == 1
    shut(server, orchestrator)


def test_left_out_items_are_logged_once_per_change(log_events):
    clock = Clock()
    fake = FakeOrchestrator([item("c1", 19000), item("c2", "19001")])
    server, api, orchestrator, stub = polling(clock, fake)
    clock.advance(10)
    stub.flush()
    assert ids(server) == ["engine-a", "c1"]
    [warning] = logged(log_events, "left out")
    assert warning["why"] == "item 1: no usable port"
    fake.engines.append(item("c3", -1))
    clock.advance(10)
    stub.flush()
    assert len(logged(log_events, "left out")) == 2
    shut(server, orchestrator)


def test_stopping_cancels_the_request_under_way():
    clock = Clock()
    cancelled = []

    class HangingClient:
        def get(self, url, **kwargs):
            assert kwargs["allow_redirects"] is False
            return Deferred(lambda d: cancelled.append(url))

    server, api, orchestrator, stub = polling(clock, FakeOrchestrator(), http=HangingClient())
    assert cancelled == []
    stopped = orchestrator.stopService()
    assert cancelled == ["http://orchestrator.test:8000/engines"]
    assert stopped.called
    assert orchestrator.tasks.pending == set()
    server.stopService()


# --- events ------------------------------------------------------------------------


def test_streams_are_reported_to_the_events_endpoints(log_events):
    clock = Clock()
    fake = FakeOrchestrator([item("c1", 19000, forwarded=True)])
    server, api, orchestrator, stub = polling(clock, fake)
    events = EventReporter(
        engines_url="http://orchestrator.test:8000/engines",
        http=stub,
        clock=clock,
        streams=lambda: list(server.streams.values()),
        api_key=API_KEY,
    )
    events.startService()
    assert API_KEY not in repr(events)
    request = FakeRequest()
    attached = Deferred.fromCoroutine(server.attach(KEY, "infohash", request))
    api.readers[0].dataReceived(packets(0, 50))
    assert attached.called
    server.streams[KEY].source.jitter = lambda: 0.0
    clock.advance(1)
    stub.flush()
    auth = [f"Bearer {API_KEY}".encode()]
    assert fake.events == [
        (
            "/events/stream_started",
            {
                "container_id": "c1",
                "engine": {"host": "127.0.0.1", "port": 19000},
                "stream": {"key_type": "infohash", "key": KEY},
                "session": {
                    "playback_session_id": "session-1",
                    "stat_url": f"http://127.0.0.1:19000/ace/stat/{KEY}/session-1",
                    "command_url": f"http://127.0.0.1:19000/ace/cmd/{KEY}/session-1",
                    "is_live": 1,
                },
                "labels": {"stream_id": f"{KEY}|session-1"},
            },
            auth,
        )
    ]
    clock.advance(1)
    stub.flush()
    assert len(fake.events) == 1, "reported once"

    # A fail-over ends one session and starts another.
    fake.engines = []
    clock.pump([1] * 8)
    stub.flush()
    api.readers[1].dataReceived(packets(500, 10))
    clock.advance(1)
    stub.flush()
    assert [
        (path, e["container_id"], e.get("stream_id") or e["labels"]["stream_id"])
        for path, e, _ in fake.events[1:]
    ] == [
        ("/events/stream_ended", "c1", f"{KEY}|session-1"),
        ("/events/stream_started", "engine-a", f"{KEY}|session-2"),
    ]

    # An orchestrator that does not answer: the stream goes on, said once.
    fake.events_mode = "hang"
    stopped = Deferred.fromCoroutine(server.stop_stream(KEY, "test"))
    clock.pump([1] * 10)
    stub.flush()
    assert stopped.called
    [warning] = logged(log_events, "event report failed")
    assert warning["why"] == "stream_ended: no answer within 5s"
    assert events.reported == {}
    assert events.tasks.pending == set()
    shut(server, events, orchestrator)


# --- through real sockets ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_player_moves_off_an_engine_the_orchestrator_withdrew(log_events):
    first = start_engine(bitrate=8_000_000)
    second = start_engine(bitrate=8_000_000)
    fake = FakeOrchestrator(
        [item("c1", first.port.getHost().port), item("c2", second.port.getHost().port)]
    )
    orchestrator_port = reactor.listenTCP(0, Site(fake), interface="127.0.0.1")
    config = Config(
        listen="tcp:0:interface=127.0.0.1",
        engines=(),
        engines_url=f"http://127.0.0.1:{orchestrator_port.getHost().port}/engines",
        engines_api_key=API_KEY,
        tuning=Tuning(engines_refresh=0.1, cleanup_grace=0.2, heartbeat_interval=0.2),
    )
    service = make_service(config, reactor, listen=False)
    registry = service.getServiceNamed("streams")
    proxy_port = None
    try:
        service.startService()
        proxy_port = reactor.listenTCP(0, make_site(registry, config), interface="127.0.0.1")
        proxy_url = f"http://127.0.0.1:{proxy_port.getHost().port}"
        await eventually(
            lambda: [(e.id, e.healthy) for e in registry.engines.engines]
            == [("c1", True), ("c2", True)],
            what="both announced engines probed",
        )
        shown = await treq.json_content(await treq.get(proxy_url + "/engines"))
        assert [e["id"] for e in shown] == ["c1", "c2"]

        player = await Player.open(f"{proxy_url}/ace/getstream?id={HASHES[0]}")
        await player.wait_bytes(100 * PACKET_SIZE)
        assert len(first.engine.getstream_calls) == 1
        [(first_session, on_c1)] = first.engine.sessions.items()

        fake.engines = fake.engines[1:]
        # c1's session is stopped; bytes past all it sent come from c2.
        await eventually(lambda: first_session in first.engine.stopped, what="c1's stop")
        await player.wait_bytes(on_c1.bytes_sent + 500 * PACKET_SIZE)
        assert [e.id for e in registry.engines.engines] == ["c2"]
        assert len(first.engine.getstream_calls) == 1
        assert len(second.engine.getstream_calls) == 1
        assert registry.streams[HASHES[0]].engine.id == "c2"
        assert logged(log_events, "withdrawn")
        assert len(check_whole_packets(player.data, HASHES[0], allowed_jumps=1).gaps) <= 1
        assert player.clean_end is None, "the player kept its connection"
        assert all(
            r.requestHeaders.getRawHeaders(b"authorization") == [f"Bearer {API_KEY}".encode()]
            for r in fake.requests
        )
        assert not any(API_KEY in repr(e) for e in log_events)
        player.disconnect()
    finally:
        await service.stopService()
        if proxy_port is not None:
            await proxy_port.stopListening()
        await orchestrator_port.stopListening()
        await first.stop()
        await second.stop()
