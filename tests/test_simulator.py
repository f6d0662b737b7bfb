"""
Tests for L{acestream_proxy.testing.engine} and the C{acesim} twistd plugin.

Timer behaviour is tested with a L{Clock} and an in-memory HTTP connection;
the HTTP API, streaming and fault switches on real sockets of 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import attrs
import av
import pytest
import pytest_twisted
import treq
from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.server import Site

import twisted.plugins
from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID, PacketAligner
from acestream_proxy.testing import synthetic
from acestream_proxy.testing.engine import (
    DESYNC_JUNK,
    FAULTS,
    MAX_BACKLOG_SECONDS,
    SimulatedEngine,
    content_tag,
    getstream_path,
)
from acestream_proxy.testing.synthetic import DATA_PID, PMT_PID

REPO = Path(__file__).resolve().parents[1]
HASH = "0123456789abcdef0123456789abcdef01234567"
OTHER_HASH = "fedcba9876543210fedcba9876543210fedcba98"
TAG = content_tag(HASH)

# Clock tests: 1600 packets/s in batches of 1/16 s (exact in binary floating
# point, so every advance of one interval is exactly one batch).
CLOCK_PPS = 1600
CLOCK_BITRATE = CLOCK_PPS * PACKET_SIZE * 8
INTERVAL = 1 / 16
PER_BATCH = 100

# Real-socket tests: a fast stream, so that 0.3 s carry plenty of packets.
LIVE_BITRATE = 16_000_000
LIVE_INTERVAL = 0.02
SAFETY_TIMEOUT = 10.0  # only so that a broken test fails instead of hanging


def pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


def packets(data: bytes) -> list[bytes]:
    return [data[i : i + PACKET_SIZE] for i in range(0, len(data), PACKET_SIZE)]


def seqs(data: bytes) -> list[int]:
    parsed = (synthetic.parse_data_packet(p) for p in packets(data))
    return [p[0] for p in parsed if p is not None]


# --- in-memory HTTP on a Clock ------------------------------------------------


@attrs.define
class FakeConnection:
    """One HTTP/1.0 exchange over a StringTransport."""

    protocol: Any
    transport: StringTransport
    _read: int = 0

    @property
    def head(self) -> bytes:
        head, found, _ = self.transport.value().partition(b"\r\n\r\n")
        assert found, "no response head yet"
        return head

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    @property
    def body(self) -> bytes:
        return self.transport.value().partition(b"\r\n\r\n")[2]

    def take(self) -> bytes:
        """The body bytes that arrived since the previous call."""
        body = self.body
        new, self._read = body[self._read :], len(body)
        return new

    def json(self) -> Any:
        return json.loads(self.body)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


@attrs.define
class FakeHTTP:
    """A simulated engine on a Clock, reached over in-memory connections."""

    clock: Clock
    engine: SimulatedEngine
    site: Site

    @classmethod
    def make(cls, **kwargs: Any) -> FakeHTTP:
        clock = Clock()
        clock.advance(1_000)
        kwargs.setdefault("bitrate", CLOCK_BITRATE)
        kwargs.setdefault("batch_interval", INTERVAL)
        engine = SimulatedEngine(clock, **kwargs)
        return cls(clock, engine, Site(engine.resource(), reactor=clock, timeout=None))

    def request(self, path: str, method: str = "GET") -> FakeConnection:
        protocol = self.site.buildProtocol(None)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 6878),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        protocol.makeConnection(transport)
        protocol.dataReceived(
            f"{method} {path} HTTP/1.0\r\nHost: engine.test:6878\r\n\r\n".encode()
        )
        return FakeConnection(protocol, transport)

    def getstream(self, infohash: str = HASH, param: str = "infohash") -> dict:
        response = self.request(getstream_path(infohash, param)).json()["response"]
        assert response is not None
        return response

    def play(self, infohash: str = HASH) -> tuple[dict, FakeConnection]:
        response = self.getstream(infohash)
        connection = self.request(local(response["playback_url"]))
        assert connection.status == 200
        return response, connection

    def tick(self, batches: int = 1) -> None:
        for _ in range(batches):
            self.clock.advance(INTERVAL)


def local(url: str) -> str:
    """The path of an engine URL (the in-memory engine is at engine.test)."""
    prefix = "http://engine.test:6878"
    assert url.startswith(prefix), url
    return url[len(prefix) :]


class TestClockDriven:
    def test_batches_carry_consecutive_seqs(self) -> None:
        fake = FakeHTTP.make()
        fake.clock.advance(2.5)
        _, playback = fake.play()
        assert playback.header(b"content-type") == b"video/mp2t"
        first = playback.take()
        assert seqs(first) == [int(2.5 * CLOCK_PPS)], "starts at the current seq"
        previous = seqs(first)[-1]
        for batch in range(1, 9):
            fake.tick()
            data = playback.take()
            ps = packets(data)
            assert [pid(p) for p in ps[:2]] == [PAT_PID, PMT_PID]
            assert ps[0][3] & 0xF == batch & 0xF, "PAT continuity counter"
            assert ps[1][3] & 0xF == batch & 0xF, "PMT continuity counter"
            assert all(pid(p) == DATA_PID for p in ps[2:])
            batch_seqs = seqs(data)
            assert batch_seqs == list(range(previous + 1, previous + 1 + PER_BATCH))
            assert {synthetic.parse_data_packet(p)[2] for p in ps[2:]} == {
                fake.clock.seconds()
            }, "sent_at is the engine time of the batch"
            previous = batch_seqs[-1]
        report = synthetic.verify(playback.body, content_tag=TAG)
        assert report.ok, report.describe()
        assert report.data_packets == 1 + 8 * PER_BATCH
        assert fake.engine.sessions[playback_session(fake)].bytes_sent == len(
            playback.body
        )

    def test_sessions_of_one_content_share_the_clock(self) -> None:
        fake = FakeHTTP.make()
        _, first = fake.play()
        fake.tick(3)
        fake.clock.advance(0.01)  # the second viewer is off the batch grid
        second_response = fake.getstream(HASH, param="id")
        second = fake.request(local(second_response["playback_url"]))
        _, other = fake.play(OTHER_HASH)
        for _ in range(5):
            fake.tick()
            now = fake.engine.current_seq()
            # Whatever moment each batch was cut at, the newest packet of
            # every session is the one due now.
            assert seqs(first.take())[-1] == now
            assert seqs(second.take())[-1] == now
            assert seqs(other.take())[-1] == now
        assert synthetic.verify(first.body, content_tag=TAG).ok
        assert synthetic.verify(second.body, content_tag=TAG).ok
        assert synthetic.verify(other.body, content_tag=content_tag(OTHER_HASH)).ok
        overlap = set(seqs(first.body)) & set(seqs(second.body))
        assert len(overlap) > 4 * PER_BATCH

    def test_reconnect_resumes_at_the_current_seq(self) -> None:
        fake = FakeHTTP.make()
        response, playback = fake.play()
        fake.tick(2)
        last = seqs(playback.body)[-1]
        playback.lose()
        fake.clock.advance(1.0)
        again = fake.request(local(response["playback_url"]))
        first = seqs(again.take())
        assert first == [fake.engine.current_seq()] == [last + CLOCK_PPS]

    def test_stop_ends_playback_and_cleans_up_timers(self) -> None:
        fake = FakeHTTP.make()
        response, playback = fake.play()
        second = fake.request(local(response["playback_url"]))
        _, other = fake.play(OTHER_HASH)
        session_id = response["playback_session_id"]
        assert fake.engine.sessions[session_id].playback_connections == 2
        assert fake.engine.playback_connections == 3
        assert len(fake.clock.getDelayedCalls()) == 3
        stop = fake.request(local(response["command_url"]) + "?method=stop")
        assert stop.json() == {"response": "ok", "error": None}
        assert playback.transport.disconnecting and second.transport.disconnecting
        assert not other.transport.disconnecting
        assert len(fake.clock.getDelayedCalls()) == 1
        assert fake.engine.stopped == [session_id]
        assert session_id not in fake.engine.sessions
        assert fake.engine.playback_connections == 1
        playback.take()
        fake.tick(3)
        assert playback.take() == b""
        assert fake.request(local(response["playback_url"])).status == 404
        other.lose()
        assert fake.clock.getDelayedCalls() == []

    def test_connection_lost_stops_the_timer(self) -> None:
        fake = FakeHTTP.make()
        response, playback = fake.play()
        assert fake.clock.getDelayedCalls()
        playback.lose()
        assert fake.clock.getDelayedCalls() == []
        session = fake.engine.sessions[response["playback_session_id"]]
        assert session.playback_connections == 0
        assert fake.engine.playback_connections == 0

    def test_drop_playback_aborts(self) -> None:
        fake = FakeHTTP.make()
        _, playback = fake.play()
        _, other = fake.play(OTHER_HASH)
        assert fake.engine.drop_playback() == 2
        assert playback.transport.disconnected and other.transport.disconnected
        assert fake.clock.getDelayedCalls() == []
        assert fake.engine.playback_connections == 0
        assert not playback.body.endswith(b"0\r\n\r\n")

    def test_backpressure_holds_batches_until_resumed(self) -> None:
        """
        A backed-up client gets the packets that fell due while it was
        paused, in order, once it takes data again.
        """
        fake = FakeHTTP.make()
        _, playback = fake.play()
        fake.tick()
        playback.transport.producer.pauseProducing()
        before = len(playback.body)
        fake.tick(4)
        assert len(playback.body) == before
        playback.transport.producer.resumeProducing()
        fake.tick()
        report = synthetic.verify(playback.body, content_tag=TAG)
        assert report.ok and not report.gaps, report.describe()
        assert seqs(playback.body)[-1] == fake.engine.current_seq()

    def test_backpressure_past_the_backlog_skips(self) -> None:
        """A live engine skips what a client backed up for too long missed."""
        fake = FakeHTTP.make()
        _, playback = fake.play()
        fake.tick()
        playback.transport.producer.pauseProducing()
        fake.clock.advance(MAX_BACKLOG_SECONDS * 2)
        playback.transport.producer.resumeProducing()
        fake.tick()
        report = synthetic.verify(playback.body, content_tag=TAG, allowed_jumps=1)
        assert report.ok and len(report.gaps) == 1, report.describe()
        assert seqs(playback.body)[-1] == fake.engine.current_seq()

    def test_stat_reports_bytes_sent(self) -> None:
        fake = FakeHTTP.make()
        response, playback = fake.play()
        fake.tick(3)
        stat = fake.request(local(response["stat_url"])).json()
        assert stat["error"] is None
        assert stat["response"] == {
            "status": "dl",
            "peers": 12,
            "speed_down": 500,
            "speed_up": 20,
            "downloaded": len(playback.body),
            "uploaded": 0,
        }


class TestClockDrivenFaults:
    def test_playback_stall(self) -> None:
        fake = FakeHTTP.make()
        _, playback = fake.play()
        fake.tick()
        fake.engine.faults.add("playback_stall")
        stalled_at = len(playback.body)
        fake.tick(10)
        assert len(playback.body) == stalled_at
        assert not playback.transport.disconnecting
        assert fake.engine.playback_connections == 1
        fake.engine.faults.discard("playback_stall")
        fake.tick()
        assert len(playback.body) > stalled_at
        assert seqs(playback.body)[-1] == fake.engine.current_seq()
        report = synthetic.verify(playback.body, content_tag=TAG, allowed_jumps=1)
        assert report.ok and len(report.gaps) == 1, report.describe()

    def test_new_playback_while_stalled_gets_nothing(self) -> None:
        fake = FakeHTTP.make(faults={"playback_stall"})
        _, playback = fake.play()
        fake.tick(5)
        assert playback.status == 200
        assert playback.body == b""

    def test_playback_desync(self) -> None:
        fake = FakeHTTP.make(faults={"playback_desync"})
        _, playback = fake.play()
        fake.tick(5)
        assert playback.body.startswith(DESYNC_JUNK)
        assert not synthetic.verify(playback.body).aligned
        aligner = PacketAligner()
        realigned = aligner.feed(playback.body)
        assert aligner.resyncs == 6 and aligner.discarded == 6 * len(DESYNC_JUNK)
        report = synthetic.verify(realigned, content_tag=TAG)
        assert report.ok, report.describe()

    def test_playback_not_ts(self) -> None:
        fake = FakeHTTP.make(faults={"playback_not_ts"})
        _, playback = fake.play()
        fake.tick(3)
        assert playback.header(b"content-type") == b"text/plain"
        assert len(playback.body) > 3 * PER_BATCH * PACKET_SIZE
        assert bytes([synthetic.SYNC_BYTE]) not in playback.body
        assert playback.body.decode("ascii").startswith("this is not")
        assert synthetic.verify(playback.body).data_packets == 0

    def test_one_timer_per_playback_connection(self) -> None:
        fake = FakeHTTP.make()
        for _ in range(3):
            fake.play()
        assert len(fake.clock.getDelayedCalls()) == 3


class TestRouting:
    """
    What the router answers outside the happy paths: the engine's own plain
    404 and 405, never a redirect or a page of the web framework's.
    """

    @pytest.mark.parametrize(
        "path",
        [
            "/",
            "/nothing/here",
            "/sim//state",
            "/webui//api/service",
            "/ace/getstream/extra",
            f"/ace/r/{HASH}",
            f"/ace/r/{HASH}/{'0' * 32}/extra",
            "/sim/faults",
            "/sim/%73tate",
            "/%ff",
        ],
    )
    @pytest.mark.parametrize("method", ["GET", "POST"])
    def test_unknown_path_is_a_plain_404(self, path: str, method: str) -> None:
        fake = FakeHTTP.make()
        answer = fake.request(path, method)
        assert (answer.status, answer.body) == (404, b"not found")
        assert answer.header(b"content-type") == b"text/plain"
        assert answer.header(b"location") is None

    @pytest.mark.parametrize(
        "method, path",
        [
            ("POST", "/webui/api/service?method=get_version"),
            ("DELETE", getstream_path(HASH)),
            ("HEAD", getstream_path(HASH)),
            ("HEAD", "/sim/state"),
            ("GET", "/sim/drop"),
            ("GET", "/sim/faults/playback_stall"),
            ("PUT", "/sim/faults/playback_stall"),
        ],
    )
    def test_wrong_method_is_a_plain_405(self, method: str, path: str) -> None:
        fake = FakeHTTP.make()
        answer = fake.request(path, method)
        assert answer.status == 405
        assert answer.header(b"content-type") == b"text/plain"
        if method != "HEAD":
            assert answer.body == b"method not allowed"
        assert fake.engine.getstream_calls == [] and fake.engine.faults == set()

    @pytest.mark.parametrize("path", ["/sim/state/", "//sim/state", "/sim/state?x=1"])
    def test_outer_slashes_are_ignored(self, path: str) -> None:
        fake = FakeHTTP.make()
        answer = fake.request(path)
        assert answer.status == 200
        assert answer.json()["sessions"] == {}

    def test_ids_are_taken_as_sent(self) -> None:
        """An escaped id is not unescaped: it names no session."""
        fake = FakeHTTP.make()
        response = fake.getstream()
        path = local(response["stat_url"])
        assert fake.request(path).json()["error"] is None
        escaped = path.replace(f"/{HASH[0]}", f"/%{ord(HASH[0]):02x}", 1)
        assert escaped != path
        assert fake.request(escaped).json() == {"response": None, "error": "unknown session"}
        empty = path.replace(HASH, "")
        assert fake.request(empty).json() == {"response": None, "error": "unknown session"}

    def test_whole_answers_give_their_length(self) -> None:
        fake = FakeHTTP.make()
        for answer in (fake.request("/sim/state"), fake.request("/nothing")):
            assert answer.header(b"content-length") == b"%d" % len(answer.body)


def playback_session(fake: FakeHTTP) -> str:
    (session_id,) = fake.engine.sessions
    return session_id


def one_second_of_output(directory: Path) -> Path:
    """About one second of a 4 Mbit/s playback, written to a file."""
    fake = FakeHTTP.make(bitrate=4_000_000, batch_interval=0.05)
    _, playback = fake.play()
    for _ in range(20):
        fake.clock.advance(0.05)
    assert len(playback.body) > 4_000_000 / 8 * 0.9
    path = directory / "simulated.ts"
    path.write_bytes(playback.body)
    return path


def test_output_is_mpegts_to_libavformat(tmp_path: Path) -> None:
    with av.open(str(one_second_of_output(tmp_path))) as container:
        assert "mpegts" in container.format.name
        assert DATA_PID in [stream.id for stream in container.streams]


def test_output_is_mpegts_to_ffprobe(tmp_path: Path) -> None:
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        pytest.skip("ffprobe not on PATH")
    result = subprocess.run(
        [ffprobe, "-v", "error", "-show_format", str(one_second_of_output(tmp_path))],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "format_name=mpegts" in result.stdout


# --- real sockets ------------------------------------------------------------


@attrs.define
class Live:
    engine: SimulatedEngine
    port: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"


@pytest_twisted.async_yield_fixture
async def live():
    engine = SimulatedEngine(reactor, bitrate=LIVE_BITRATE, batch_interval=LIVE_INTERVAL)
    port = reactor.listenTCP(0, Site(engine.resource()), interface="127.0.0.1")
    yield Live(engine, port)
    engine.drop_playback()
    await port.stopListening()


async def get(url: str, method: str = "GET") -> tuple[int, bytes, Any]:
    response = await treq.request(method, url, persistent=False).addTimeout(
        SAFETY_TIMEOUT, reactor
    )
    body = await response.content()
    return response.code, body, response


async def get_json(url: str, method: str = "GET") -> Any:
    code, body, _ = await get(url, method)
    assert code == 200, body
    return json.loads(body)


async def until(predicate: Callable[[], object], what: str) -> None:
    """Wait for a condition another party brings about (never a fixed delay)."""
    deadline = reactor.seconds() + SAFETY_TIMEOUT
    while not predicate():
        assert reactor.seconds() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.005, lambda: None)


class Reader(Protocol):
    """Keeps a streamed body; lets a test wait until enough of it arrived."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.reason: Failure | None = None
        self.finished: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        ready = [(n, d) for n, d in self._waiting if len(self.data) >= n]
        for entry in ready:
            self._waiting.remove(entry)
            entry[1].callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.finished.callback(None)

    def wait_for(self, size: int) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if len(self.data) >= size:
            waiter.callback(None)
        else:
            self._waiting.append((size, waiter))
        return waiter.addTimeout(SAFETY_TIMEOUT, reactor)

    def close(self) -> None:
        self.transport.stopProducing()


async def open_playback(url: str) -> tuple[Any, Reader]:
    response = await treq.get(url, unbuffered=True, persistent=False).addTimeout(
        SAFETY_TIMEOUT, reactor
    )
    reader = Reader()
    if response.code == 200:
        response.deliverBody(reader)
    return response, reader


async def getstream(live: Live, infohash: str = HASH, param: str = "infohash") -> dict:
    answer = await get_json(live.url + getstream_path(infohash, param))
    assert answer["error"] is None, answer
    return answer["response"]


class TestLiveAPI:
    @pytest_twisted.ensureDeferred
    async def test_get_version(self, live: Live) -> None:
        url = live.url + "/webui/api/service?method=get_version&format=json"
        assert await get_json(url) == {
            "result": {"code": 3010500, "platform": "linux", "version": "3.1.5"},
            "error": None,
        }
        other = await get_json(live.url + "/webui/api/service?method=nothing")
        assert other["result"] is None and other["error"]

    @pytest.mark.parametrize("param", ["infohash", "id"])
    @pytest_twisted.ensureDeferred
    async def test_getstream(self, live: Live, param: str) -> None:
        answer = await get_json(live.url + getstream_path(HASH, param))
        assert answer["error"] is None
        response = answer["response"]
        session_id = response["playback_session_id"]
        int(session_id, 16)
        path = f"{HASH}/{session_id}"
        assert response == {
            "playback_url": f"{live.url}/ace/r/{path}",
            "stat_url": f"{live.url}/ace/stat/{path}",
            "command_url": f"{live.url}/ace/cmd/{path}",
            "playback_session_id": session_id,
            "is_live": 1,
            "infohash": HASH,
        }
        assert live.engine.getstream_calls == [(param, HASH)]
        session = live.engine.sessions[session_id]
        assert (session.hash, session.param, session.bytes_sent) == (HASH, param, 0)
        assert session.playback_connections == 0

    @pytest.mark.parametrize(
        "query", ["format=json", "format=json&infohash=xyz", "format=json&id=" + "0" * 39]
    )
    @pytest_twisted.ensureDeferred
    async def test_getstream_without_valid_hash(self, live: Live, query: str) -> None:
        answer = await get_json(live.url + "/ace/getstream?" + query)
        assert answer["response"] is None and answer["error"]
        assert live.engine.sessions == {}

    @pytest_twisted.ensureDeferred
    async def test_playback_streams_valid_ts(self, live: Live) -> None:
        response = await getstream(live)
        playback, reader = await open_playback(response["playback_url"])
        assert playback.code == 200
        assert playback.headers.getRawHeaders(b"content-type") == [b"video/mp2t"]
        bytes_per_second = LIVE_BITRATE / 8
        await reader.wait_for(int(0.3 * bytes_per_second))
        reader.close()
        await reader.finished
        data = bytes(reader.data[: len(reader.data) // PACKET_SIZE * PACKET_SIZE])
        report = synthetic.verify(data, content_tag=TAG)
        assert report.ok, report.describe()
        assert report.last_seq - report.first_seq >= 0.25 * bytes_per_second / PACKET_SIZE
        session = live.engine.sessions[response["playback_session_id"]]
        assert session.bytes_sent >= len(reader.data)
        await until(lambda: live.engine.playback_connections == 0, "disconnect")
        stat = await get_json(response["stat_url"])
        assert stat["response"]["downloaded"] == session.bytes_sent

    @pytest_twisted.ensureDeferred
    async def test_stop_ends_playback(self, live: Live) -> None:
        response = await getstream(live)
        _, reader = await open_playback(response["playback_url"])
        await reader.wait_for(PACKET_SIZE * 3)
        assert live.engine.playback_connections == 1
        answer = await get_json(response["command_url"] + "?method=stop")
        assert answer == {"response": "ok", "error": None}
        await reader.finished.addTimeout(SAFETY_TIMEOUT, reactor)
        reason = reader.reason
        assert reason.check(ResponseDone), reason
        session_id = response["playback_session_id"]
        assert live.engine.stopped == [session_id]
        assert live.engine.sessions == {} and live.engine.playback_connections == 0
        code, _, _ = await get(response["playback_url"])
        assert code == 404
        other = await get_json(response["command_url"] + "?method=pause")
        assert other["response"] is None and other["error"]

    @pytest_twisted.ensureDeferred
    async def test_drop_over_http(self, live: Live) -> None:
        response = await getstream(live)
        _, reader = await open_playback(response["playback_url"])
        await reader.wait_for(PACKET_SIZE * 3)
        assert await get_json(live.url + "/sim/drop", "POST") == {"dropped": 1}
        await reader.finished.addTimeout(SAFETY_TIMEOUT, reactor)
        reason = reader.reason
        assert not reason.check(ResponseDone), "the body must end abruptly"
        assert live.engine.playback_connections == 0
        assert response["playback_session_id"] in live.engine.sessions

    @pytest_twisted.ensureDeferred
    async def test_unknown_routes_and_sessions(self, live: Live) -> None:
        assert (await get(live.url + "/nothing/here"))[0] == 404
        assert (await get(f"{live.url}/ace/r/{HASH}/{'0' * 32}"))[0] == 404
        assert (await get(live.url + "/sim/state", "POST"))[0] == 405
        assert (await get(live.url + "/sim/faults/no_such_fault", "POST"))[0] == 404
        response = await getstream(live)
        wrong_hash = response["playback_url"].replace(HASH, OTHER_HASH)
        assert (await get(wrong_hash))[0] == 404
        stat = await get_json(f"{live.url}/ace/stat/{HASH}/{'0' * 32}")
        assert stat["response"] is None and stat["error"]

    @pytest_twisted.ensureDeferred
    async def test_state(self, live: Live) -> None:
        response = await getstream(live)
        stopped = await getstream(live, OTHER_HASH, "id")
        _, reader = await open_playback(response["playback_url"])
        await reader.wait_for(PACKET_SIZE)
        await get_json(stopped["command_url"] + "?method=stop")
        await get_json(live.url + "/sim/faults/playback_desync", "POST")
        state = await get_json(live.url + "/sim/state")
        session_id = response["playback_session_id"]
        assert state["getstream_calls"] == [["infohash", HASH], ["id", OTHER_HASH]]
        assert list(state["sessions"]) == [session_id]
        session = state["sessions"][session_id]
        assert session["hash"] == HASH and session["param"] == "infohash"
        assert session["playback_connections"] == 1
        assert session["bytes_sent"] >= PACKET_SIZE
        assert session["started_at"] == live.engine.sessions[session_id].started_at
        assert state["stopped"] == [stopped["playback_session_id"]]
        assert state["playback_connections"] == 1
        assert state["faults"] == ["playback_desync"]
        reader.close()


async def set_fault(live: Live, name: str, on: bool = True) -> None:
    answer = await get_json(f"{live.url}/sim/faults/{name}", "POST" if on else "DELETE")
    assert (name in answer["faults"]) == on
    assert (name in live.engine.faults) == on


class TestLiveFaults:
    @pytest.mark.parametrize(
        "fault, check",
        [
            (
                "getstream_error",
                lambda code, body: code == 200
                and json.loads(body)["response"] is None
                and json.loads(body)["error"],
            ),
            ("getstream_500", lambda code, body: code == 500 and body == b"boom"),
            ("getstream_garbage", lambda code, body: code == 200 and not_json(body)),
            (
                "getstream_wrong_shape",
                lambda code, body: code == 200
                and json.loads(body) == {"response": {"foo": 1}, "error": None},
            ),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_getstream_faults(
        self, live: Live, fault: str, check: Callable[[int, bytes], bool]
    ) -> None:
        await set_fault(live, fault)
        code, body, _ = await get(live.url + getstream_path(HASH))
        assert check(code, body), (code, body)
        assert live.engine.sessions == {}
        assert live.engine.getstream_calls == [("infohash", HASH)]
        await set_fault(live, fault, on=False)
        await getstream(live)
        assert len(live.engine.sessions) == 1

    @pytest_twisted.ensureDeferred
    async def test_getstream_hang(self, live: Live) -> None:
        await set_fault(live, "getstream_hang")
        outcome: list[object] = []
        pending = treq.get(live.url + getstream_path(HASH), persistent=False)
        pending.addBoth(outcome.append)
        await until(lambda: live.engine.getstream_calls, "the getstream call")
        # Another full request/response after the hanging one was received.
        await get_json(live.url + "/webui/api/service?method=get_version")
        assert outcome == [], "getstream was answered"
        assert live.engine.sessions == {}
        pending.cancel()
        await pending
        assert len(outcome) == 1 and isinstance(outcome[0], Failure)

    @pytest_twisted.ensureDeferred
    async def test_foreign_playback(self, live: Live) -> None:
        await set_fault(live, "foreign_playback")
        response = await getstream(live)
        foreign = f"http://127.0.0.2:{live.port.getHost().port}/ace/"
        for key in ("playback_url", "stat_url", "command_url"):
            assert response[key].startswith(foreign), response[key]
        # The session itself is real: reached at the engine's own address.
        local_url = response["playback_url"].replace("127.0.0.2", "127.0.0.1")
        _, reader = await open_playback(local_url)
        await reader.wait_for(PACKET_SIZE)
        reader.close()

    @pytest_twisted.ensureDeferred
    async def test_playback_500(self, live: Live) -> None:
        response = await getstream(live)
        await set_fault(live, "playback_500")
        code, _, _ = await get(response["playback_url"])
        assert code == 500
        assert live.engine.playback_connections == 0

    @pytest_twisted.ensureDeferred
    async def test_version_fail(self, live: Live) -> None:
        await set_fault(live, "version_fail")
        code, _, _ = await get(live.url + "/webui/api/service?method=get_version")
        assert code == 500

    @pytest_twisted.ensureDeferred
    async def test_playback_desync_and_not_ts_over_http(self, live: Live) -> None:
        response = await getstream(live)
        await set_fault(live, "playback_desync")
        _, reader = await open_playback(response["playback_url"])
        await reader.wait_for(PACKET_SIZE * 50)
        reader.close()
        assert bytes(reader.data).startswith(DESYNC_JUNK)
        await set_fault(live, "playback_desync", on=False)
        await set_fault(live, "playback_not_ts")
        text, reader = await open_playback(response["playback_url"])
        assert text.headers.getRawHeaders(b"content-type") == [b"text/plain"]
        await reader.wait_for(PACKET_SIZE * 50)
        reader.close()
        assert b"\x47" not in reader.data

    def test_fault_names(self) -> None:
        assert FAULTS == {
            "getstream_error",
            "getstream_500",
            "getstream_garbage",
            "getstream_wrong_shape",
            "getstream_hang",
            "foreign_playback",
            "playback_stall",
            "playback_desync",
            "playback_not_ts",
            "playback_500",
            "version_fail",
        }


def not_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return True
    return False


# --- the twistd plugin -------------------------------------------------------


@pytest.fixture
def acesim(monkeypatch: pytest.MonkeyPatch) -> IServiceMaker:
    """The acesim plugin, found the way twistd finds it."""
    monkeypatch.syspath_prepend(str(REPO))
    plugin_dir = str(REPO / "twisted" / "plugins")
    if plugin_dir not in twisted.plugins.__path__:
        monkeypatch.setattr(
            twisted.plugins, "__path__", [*twisted.plugins.__path__, plugin_dir]
        )
    found = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "acesim" in found, sorted(found)
    return found["acesim"]


class TestPlugin:
    def test_options(self, acesim: IServiceMaker) -> None:
        options = acesim.options()
        options.parseOptions([])
        assert options["port"] == "tcp:6878:interface=127.0.0.1"
        assert (options["bitrate"], options["batch-ms"], options["faults"]) == (
            4_000_000,
            50.0,
            [],
        )
        options = acesim.options()
        options.parseOptions(
            ["--port", "7000", "--bitrate", "1000000", "--batch-ms", "20"]
            + ["--fault", "playback_stall", "--fault", "version_fail"]
        )
        assert options["port"] == "tcp:7000:interface=127.0.0.1"
        assert (options["bitrate"], options["batch-ms"]) == (1_000_000, 20.0)
        assert options["faults"] == ["playback_stall", "version_fail"]
        with pytest.raises(usage.UsageError):
            acesim.options().parseOptions(["--fault", "no_such_fault"])
        with pytest.raises(usage.UsageError):
            acesim.options().parseOptions(["--bitrate", "0"])

    @pytest_twisted.ensureDeferred
    async def test_make_service(self, acesim: IServiceMaker) -> None:
        options = acesim.options()
        options.parseOptions(
            ["--port", "tcp:0:interface=127.0.0.1", "--fault", "version_fail"]
        )
        service = acesim.makeService(options)
        assert IService.providedBy(service)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            service.startService()
            (port,) = service.endpoint.ports
        finally:
            globalLogPublisher.removeObserver(events.append)
        try:
            address = port.getHost()
            announced = [e for e in events if e.get("log_namespace") == "acesim"]
            assert len(announced) == 1
            assert (announced[0]["host"], announced[0]["port"]) == ("127.0.0.1", address.port)
            url = f"http://127.0.0.1:{address.port}"
            code, _, _ = await get(url + "/webui/api/service?method=get_version")
            assert code == 500, "started with the version_fail fault"
            state = await get_json(url + "/sim/state")
            assert state["faults"] == ["version_fail"]
        finally:
            await service.stopService()

