"""
HLS viewers and segments, on a L{Clock} with the fake engine API and the
embedded store: an HLS viewer counts as one of its stream's players (the
stream's players, the store's, the players gauge) and is one per address and
user agent; the limits refuse a new one, not one already watching; one that
keeps fetching stays, one that stops is dropped as a ghost, and the stream
with nobody left stops after its grace.  The owner cuts real MPEG-TS (built
here packet by packet: PAT, PMT naming an MPEG-2 video PID, video PES packets
with PTS, keyframes flagged with random_access_indicator) into segments at
its keyframes, or at chunk starts when it has none; the playlist and each
segment's bytes are checked exactly.
"""

import struct
from collections import defaultdict

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from acestream_proxy.constants import PlayerField
from acestream_proxy.errors import NotFound, Unavailable
from acestream_proxy.hls.cutter import longest_segment
from acestream_proxy.hls.segment import Segment
from acestream_proxy.hls.segments import RETRY_AFTER
from acestream_proxy.hls.viewer import HlsViewer, viewer_id
from acestream_proxy.http.routes import ProxyWeb
from acestream_proxy.stream.keyframes import MPEG2_VIDEO, KeyframeScanner
from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID, mpeg2_crc32
from acestream_proxy.testing.synthetic import pat_packet

from .fakes import FakeRequest, make_server, packets

KEY = "ef" * 20
OTHER = "fe" * 20

# --- real MPEG-TS, packet by packet -------------------------------------------

PMT_PID = 0x1000
VIDEO_PID = 0x101
FPS = 20
FRAME_TICKS = 90_000 // FPS
#: Every engine read (one chunk each: make_server's chunk_bytes=0) is this
#: many frames, and is fed this many seconds of the clock after the one
#: before: 0.5 s, exact in binary, so that arrival times add up exactly.
FRAMES_PER_CHUNK = 10
CHUNK_SECONDS = FRAMES_PER_CHUNK / FPS
#: A keyframe every 0.75 s: they fall at varying places inside the chunks.
GOP = 15
#: Packets after the one that starts each frame's PES packet.
CONTINUATION = 2
PTS_BASE = 900_000


def psi_pids(psi: bytes) -> list[int]:
    """The PIDs of the packets in C{psi}."""
    return [((psi[i + 1] & 0x1F) << 8) | psi[i + 2] for i in range(0, len(psi), 188)]


def _psi(pid: int, cc: int, table_id: int, body: bytes) -> bytes:
    section = struct.pack(">BH", table_id, 0xB000 | (len(body) + 4)) + body
    section += struct.pack(">I", mpeg2_crc32(section))
    packet = bytes([0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | (cc & 0xF), 0]) + section
    return packet + b"\xff" * (PACKET_SIZE - len(packet))


def pmt_packet(cc: int) -> bytes:
    """The PMT of program 1: one MPEG-2 video stream on L{VIDEO_PID}."""
    body = struct.pack(">HBBBHH", 1, 0xC1, 0, 0, 0xE000 | VIDEO_PID, 0xF000)
    body += struct.pack(">BHH", MPEG2_VIDEO, 0xE000 | VIDEO_PID, 0xF000)
    return _psi(PMT_PID, cc, 0x02, body)


def pts_field(pts: int) -> bytes:
    return bytes(
        [
            0x21 | ((pts >> 29) & 0x0E),
            (pts >> 22) & 0xFF,
            0x01 | ((pts >> 14) & 0xFE),
            (pts >> 7) & 0xFF,
            0x01 | ((pts << 1) & 0xFE),
        ]
    )


def video_packet(cc: int, payload: bytes, start: bool, keyframe: bool, tag: bytes) -> bytes:
    """
    One packet of the video PID: C{payload} (a PES header and the picture's
    first bytes, or nothing) and then C{tag}-marked filler, never containing
    a start code, so that every packet of the stream is unique.
    """
    header = bytes([0x47, (0x40 if start else 0) | (VIDEO_PID >> 8), VIDEO_PID & 0xFF])
    if keyframe:
        # adaptation_field_length 1, flags: random_access_indicator.
        head = header + bytes([0x30 | (cc & 0xF), 1, 0x40])
    else:
        head = header + bytes([0x10 | (cc & 0xF)])
    body = head + payload + tag
    return body + b"\xaa" * (PACKET_SIZE - len(body))


@attrs.define
class Media:
    """
    An MPEG-2 video transport stream, made chunk by chunk: each chunk is
    PAT, PMT and L{FRAMES_PER_CHUNK} frames, each frame one PES packet (with
    its PTS) over 1 + L{CONTINUATION} packets; every L{GOP}th frame is a
    keyframe (random_access_indicator and a sequence header) while
    C{keyframes} is set.

    @ivar data: every byte made so far, in order.
    @ivar points: for each keyframe, its frame number, its packet's offset in
        C{data}, and the PAT and PMT current there.
    """

    keyframes: bool = True
    frame: int = 0
    data: bytearray = attrs.field(factory=bytearray)
    points: list = attrs.field(factory=list)
    chunk_offsets: list = attrs.field(factory=list)
    _cc: dict = attrs.field(factory=lambda: defaultdict(int))

    def _next_cc(self, pid: int) -> int:
        cc = self._cc[pid]
        self._cc[pid] = (cc + 1) & 0xF
        return cc

    def chunk(self) -> bytes:
        self.chunk_offsets.append(len(self.data))
        psi = pat_packet(self._next_cc(PAT_PID)) + pmt_packet(self._next_cc(PMT_PID))
        out = [psi]
        position = len(self.data) + len(psi)
        for _ in range(FRAMES_PER_CHUNK):
            number = self.frame
            self.frame += 1
            key = self.keyframes and number % GOP == 0
            # PES header: video stream 0xE0, no length, a PTS and nothing else.
            pes = b"\x00\x00\x01\xe0\x00\x00\x80\x80\x05"
            pes += pts_field(PTS_BASE + number * FRAME_TICKS)
            picture = b"\x00\x00\x01\xb3" if key else b"\x00\x00\x01\x00"
            if key:
                self.points.append((number, position, psi))
            tag = b"f%06dp00" % number
            out.append(video_packet(self._next_cc(VIDEO_PID), pes + picture, True, key, tag))
            for part in range(1, CONTINUATION + 1):
                tag = b"f%06dp%02d" % (number, part)
                out.append(video_packet(self._next_cc(VIDEO_PID), b"", False, False, tag))
            position += (1 + CONTINUATION) * PACKET_SIZE
        data = b"".join(out)
        self.data += data
        return data

    def point(self, frame: int) -> tuple[int, bytes]:
        """The offset in C{data} of keyframe C{frame}, and its PAT and PMT."""
        for number, offset, psi in self.points:
            if number == frame:
                return offset, psi
        raise KeyError(frame)

    def between(self, first: int, end: int) -> bytes:
        """
        What a segment from keyframe C{first} to keyframe C{end} holds: the
        PAT and PMT current at C{first}, then every packet from C{first}'s
        up to C{end}'s.
        """
        start, psi = self.point(first)
        stop, _ = self.point(end)
        return psi + bytes(self.data[start:stop])


def test_the_media_has_its_keyframes_where_the_scanner_finds_them():
    """The hand-made stream is what the proxy's scanner takes it for."""
    media = Media()
    scanner, found = KeyframeScanner(), []
    for _ in range(8):
        base = len(media.data)
        found += [base + offset for offset in scanner.feed(media.chunk())]
    assert scanner.video_pid == VIDEO_PID and scanner.stream_type == MPEG2_VIDEO
    assert found == [offset for _, offset, _ in media.points]
    assert [number for number, _, _ in media.points] == [0, 15, 30, 45, 60, 75]
    # Not all on a chunk's first packets.
    size = len(media.data) // 8
    assert len({offset % size for offset in found}) > 1


# --- a proxy on a Clock --------------------------------------------------------


@attrs.define(eq=False)
class ViewerRequest(FakeRequest):
    """A request from a client of its own address and user agent."""

    address: str = "192.0.2.10"
    user_agent: str = "hls-player/1.0"

    def getClientAddress(self):
        return IPv4Address("TCP", self.address, 50000)

    def getHeader(self, name: bytes):
        return self.user_agent.encode() if name.lower() == b"user-agent" else None


def result(d: Deferred):
    """The result of a L{Deferred} that has fired (raising its failure)."""
    assert d.called, "it should have fired by now"
    out = []
    d.addBoth(out.append)
    value = out[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


@attrs.define(eq=False)
class Proxy:
    """
    A started proxy on a L{Clock} and its engine feed: L{run} advances the
    clock chunk by chunk, feeding each engine body one L{Media} chunk (or
    synthetic data) every L{CHUNK_SECONDS}.
    """

    clock: Clock
    server: object
    api: object
    media: dict = attrs.field(factory=dict)
    fed: dict = attrs.field(factory=dict)

    @classmethod
    def start(cls, **tuning) -> "Proxy":
        clock = Clock()
        server = make_server(clock, **tuning)
        server.startService()
        return cls(clock, server, server.api)

    @property
    def store(self):
        return self.server.store

    @property
    def metrics(self):
        return self.server.metrics

    def feed(self, key: str = KEY) -> None:
        """Hand stream C{key}'s engine body its next chunk, now."""
        stream = self.server.streams.get(key)
        if stream is None or stream.stopping:
            return
        reader = self._reader(key)
        media = self.media.get(key)
        if media is None:
            seq = self.fed.get(key, 0)
            self.fed[key] = seq + 50
            reader.dataReceived(packets(seq, 50))
        else:
            reader.dataReceived(media.chunk())

    def _reader(self, key: str):
        # The fake API opens sessions in order; each key's is the one whose
        # getstream named it (no reconnection happens in these tests).
        sessions = [k for _, _, k in self.api.getstreams]
        return self.api.readers[sessions.index(key)]

    def watch(self, request, key: str = KEY, param: str | None = "id"):
        """registry.watch on a running stream: the stream and the viewer."""
        return result(Deferred.fromCoroutine(self.server.watch(key, param, request)))

    def attach(self, request=None, key: str = KEY):
        """A TS player on a running stream."""
        request = request or FakeRequest()
        d = Deferred.fromCoroutine(self.server.attach(key, "id", request))
        assert d.called
        return request

    def run(self, seconds: float, keys=(KEY,), each=None) -> None:
        """
        Advance the clock by C{seconds}, one chunk at a time: each step
        advances, feeds each key's engine, then calls C{each(now)}.
        """
        steps = round(seconds / CHUNK_SECONDS)
        assert steps * CHUNK_SECONDS == seconds
        for _ in range(steps):
            self.clock.advance(CHUNK_SECONDS)
            for key in keys:
                self.feed(key)
            if each is not None:
                each(self.clock.seconds())

    def gauge(self) -> float:
        return self.metrics.registry.get_sample_value("aceproxy_players")

    def dropped(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value(
            "aceproxy_players_dropped_total", {"reason": reason}
        )

    def players(self, key: str = KEY) -> dict:
        return result(self.store.list_players(key))

    def count(self, key: str = KEY) -> int:
        return result(self.store.count_players(key))


def started(media: Media | None = None, request=None, key: str = KEY, **tuning):
    """
    A proxy whose stream C{key} was started by an HLS viewer's first
    request, its engine body fed its first chunk: C{media}'s, or synthetic
    data (no video, no keyframes) without one.
    """
    proxy = Proxy.start(**tuning)
    if media is not None:
        proxy.media[key] = media
    request = request or ViewerRequest()
    d = Deferred.fromCoroutine(proxy.server.watch(key, "id", request))
    assert not d.called
    proxy.feed(key)
    stream, viewer = result(d)
    return proxy, stream, viewer


def fetch_playlist(proxy: Proxy, request, key: str = KEY) -> bytes:
    """
    What C{/ace/manifest.m3u8} does for C{request} (see http/routes.py):
    the viewer, the playlist, and the answer counted as its sign of life.
    """
    stream, viewer = proxy.watch(request, key)
    body = result(Deferred.fromCoroutine(stream.hls.playlist()))
    viewer.sent(len(body))
    return body


def fetch_segment(proxy: Proxy, request, sequence: int, key: str = KEY) -> bytes:
    """What C{/hls/<key>/<n>.ts} does for C{request}."""
    stream, viewer = proxy.watch(request, key, None)
    body = result(Deferred.fromCoroutine(stream.hls.segment(sequence)))
    viewer.sent(len(body))
    return body


# --- counted as players ------------------------------------------------------------


def test_a_viewer_counts_as_one_player_per_address_and_user_agent():
    proxy, stream, viewer = started(Media())
    request = ViewerRequest()
    assert isinstance(viewer, HlsViewer)
    assert viewer.info.id == viewer_id(KEY, "192.0.2.10", "hls-player/1.0")
    assert viewer.info.id.startswith("hls-")
    assert list(stream.players) == [viewer] and len(stream.players) == 1
    assert stream.players.viewers == {viewer.info.id: viewer}
    assert proxy.count() == 1 and proxy.gauge() == 1
    fields = proxy.players()[viewer.info.id]
    assert fields[PlayerField.ID] == viewer.info.id
    assert fields[PlayerField.ADDRESS] == "192.0.2.10"
    assert fields[PlayerField.USER_AGENT] == "hls-player/1.0"
    assert fields[PlayerField.WORKER] == "worker-1"
    assert fields[PlayerField.BYTES_SENT] == 0

    # Served: its bytes are what the store says it was sent, from the next
    # heartbeat round on.  (A playlist lists three segments from 6.5 s on.)
    proxy.run(7.0)
    playlist = fetch_playlist(proxy, request)
    assert playlist.startswith(b"#EXTM3U\n")
    segment = fetch_segment(proxy, request, 0)
    served = len(playlist) + len(segment)
    assert viewer.bytes_sent == served
    proxy.run(7.0)  # the round at 10 s
    assert proxy.players()[viewer.info.id][PlayerField.BYTES_SENT] == served
    assert proxy.players()[viewer.info.id][PlayerField.LAST_HEARTBEAT] == 10.0

    # Its next requests, and a segment request (no param), are the same
    # viewer: no second count.
    again, same = proxy.watch(ViewerRequest())
    assert again is stream and same is viewer
    assert proxy.watch(ViewerRequest(), param=None)[1] is viewer
    assert len(stream.players) == 1 and proxy.count() == 1 and proxy.gauge() == 1

    # Another user agent at the same address, or the same one elsewhere,
    # is another viewer.
    _, second = proxy.watch(ViewerRequest(user_agent="other-player/2.0"))
    _, third = proxy.watch(ViewerRequest(address="198.51.100.7"), param=None)
    ids = {viewer.info.id, second.info.id, third.info.id}
    assert len(ids) == 3 and all(i.startswith("hls-") for i in ids)
    assert second.info.id == viewer_id(KEY, "192.0.2.10", "other-player/2.0")
    assert len(stream.players) == 3 and proxy.count() == 3 and proxy.gauge() == 3
    assert set(proxy.players()) == ids
    assert proxy.players()[second.info.id][PlayerField.USER_AGENT] == "other-player/2.0"
    assert proxy.players()[third.info.id][PlayerField.ADDRESS] == "198.51.100.7"
    # Viewer ids name the stream too.
    assert viewer_id(OTHER, "192.0.2.10", "hls-player/1.0") != viewer.info.id


def test_a_segment_request_starts_no_stream():
    proxy = Proxy.start()
    with pytest.raises(NotFound):
        result(Deferred.fromCoroutine(proxy.server.watch(KEY, None, ViewerRequest())))
    assert proxy.server.streams == {} and proxy.api.getstreams == []
    assert proxy.gauge() == 0


# --- limits ----------------------------------------------------------------------


def test_max_clients_per_stream_refuses_a_new_viewer_not_a_watching_one():
    proxy, stream, first = started(max_clients_per_stream=2)
    _, second = proxy.watch(ViewerRequest(user_agent="b"))
    assert len(stream.players) == 2 and proxy.dropped("limit") == 0

    with pytest.raises(Unavailable) as refused:
        proxy.watch(ViewerRequest(user_agent="c"))
    assert "too many players on this stream" in refused.value.message
    assert refused.value.retry_after
    assert proxy.dropped("limit") == 1
    assert len(stream.players) == 2 and proxy.count() == 2 and proxy.gauge() == 2
    assert viewer_id(KEY, "192.0.2.10", "c") not in proxy.players()
    # A TS player is refused as well.
    with pytest.raises(Unavailable):
        result(Deferred.fromCoroutine(proxy.server.attach(KEY, "id", FakeRequest())))
    assert proxy.dropped("limit") == 2

    # The viewers already counted go on being served.
    proxy.run(1.0)
    assert proxy.watch(ViewerRequest())[1] is first
    assert proxy.watch(ViewerRequest(user_agent="b"), param=None)[1] is second
    first.sent(100)
    assert proxy.dropped("limit") == 2 and len(stream.players) == 2

    # Once one left, there is room again.
    second.abort()
    _, third = proxy.watch(ViewerRequest(user_agent="c"))
    assert set(stream.players.viewers) == {first.info.id, third.info.id}
    assert proxy.count() == 2 and proxy.gauge() == 2


def test_max_clients_refuses_a_new_viewer_on_any_stream():
    proxy, stream, first = started(max_clients=2)
    d = Deferred.fromCoroutine(proxy.server.watch(OTHER, "id", ViewerRequest(user_agent="b")))
    proxy.feed(OTHER)
    other, second = result(d)
    assert proxy.gauge() == 2 and len(proxy.server.streams) == 2

    for key in (KEY, OTHER):
        with pytest.raises(Unavailable) as refused:
            proxy.watch(ViewerRequest(user_agent="c"), key)
        assert "too many players on this proxy" in refused.value.message
    assert proxy.dropped("limit") == 2
    assert proxy.count(KEY) == 1 and proxy.count(OTHER) == 1 and proxy.gauge() == 2

    # Those watching still are, on both streams.
    assert proxy.watch(ViewerRequest())[1] is first
    assert proxy.watch(ViewerRequest(user_agent="b"), OTHER, None)[1] is second
    assert proxy.dropped("limit") == 2


# --- ghosts and the stream's end -----------------------------------------------------


TIMERS = dict(heartbeat_interval=10, ghost_client_timeout=50, cleanup_grace=5)


def test_a_viewer_that_keeps_fetching_stays_and_one_that_stops_is_dropped():
    proxy, stream, viewer = started(Media(), **TIMERS)
    request = ViewerRequest()
    pid = viewer.info.id

    def every_two_seconds(now):
        # From when the playlist lists three target durations, at 6.5 s.
        if now % 2 == 0 and now >= 8:
            fetch_playlist(proxy, request)

    # Two minutes of fetching: well past the ghost timeout.
    proxy.run(120.0, each=every_two_seconds)
    assert stream.players.viewers == {pid: viewer} and not viewer.finished
    assert proxy.dropped("ghost") == 0 and proxy.count() == 1
    assert proxy.players()[pid][PlayerField.LAST_HEARTBEAT] == 120.0

    # It stops (its last answer at 120 s, counted by the round at 130 s).
    proxy.run(10.0)
    last_beat = proxy.players()[pid][PlayerField.LAST_HEARTBEAT]
    assert last_beat == 130.0
    proxy.run(50.0)  # the round at 180 s: a heartbeat exactly as old as the timeout
    assert stream.players.viewers == {pid: viewer} and proxy.dropped("ghost") == 0
    proxy.run(9.5)
    assert stream.players.viewers == {pid: viewer}
    proxy.run(0.5)  # the round at 190 s: within one interval of the timeout
    # From its last answer (120 s): past the timeout, within two intervals,
    # since its bytes are looked at once per round.
    assert 120 + 50 < proxy.clock.seconds() <= 120 + 50 + 2 * 10
    assert viewer.finished
    assert stream.players.viewers == {} and len(stream.players) == 0
    assert proxy.dropped("ghost") == 1
    assert proxy.count() == 0 and proxy.players() == {} and proxy.gauge() == 0

    # Nobody left anywhere: the stream and its engine session stop after
    # the grace, not before.
    assert result(proxy.store.get_last_disconnect(KEY)) == 190.0
    proxy.run(4.5)
    assert proxy.server.streams == {KEY: stream} and proxy.api.stops == []
    proxy.run(0.5)
    assert proxy.server.streams == {}
    assert proxy.api.stops == ["session-1"]
    assert result(proxy.store.list_streams()) == []
    assert result(proxy.store.segments.list(KEY)) == []


def test_a_viewer_sending_bytes_stays_and_is_dropped_once_they_stop():
    """The same with bare byte counts, and a viewer that never fetches again."""
    proxy, stream, viewer = started(**TIMERS)
    for _ in range(12):  # 60 s, a little every 5 s
        proxy.run(5.0)
        viewer.sent(1000)
    assert not viewer.finished and proxy.dropped("ghost") == 0
    # Its last bytes (at 60 s) counted by the round at 70 s, dropped at 130 s.
    proxy.run(69.5)
    assert not viewer.finished
    proxy.run(0.5)
    assert viewer.finished and proxy.dropped("ghost") == 1 and proxy.count() == 0
    proxy.run(5.0)
    assert proxy.server.streams == {} and proxy.api.stops == ["session-1"]


def test_a_viewer_that_never_fetched_again_is_dropped_from_its_join():
    proxy, stream, viewer = started(**TIMERS)
    proxy.run(50.0)  # joined at 0: at the round at 50 s, not yet too old
    assert not viewer.finished
    proxy.run(10.0)
    assert viewer.finished and proxy.dropped("ghost") == 1
    proxy.run(5.0)
    assert proxy.server.streams == {} and proxy.api.stops == ["session-1"]


def test_a_ghost_viewer_leaves_the_stream_to_a_ts_player():
    proxy, stream, viewer = started(**TIMERS)
    request = proxy.attach()
    player = next(p for p in stream.players if not isinstance(p, HlsViewer))
    assert len(stream.players) == 2 and proxy.count() == 2 and proxy.gauge() == 2

    proxy.run(60.0)
    assert viewer.finished and proxy.dropped("ghost") == 1
    assert list(stream.players) == [player] and proxy.count() == 1 and proxy.gauge() == 1
    sent = player.bytes_sent
    proxy.run(120.0)
    # The TS player still plays: the stream runs on, with its session.
    assert proxy.server.streams == {KEY: stream} and proxy.api.stops == []
    assert player.bytes_sent > sent and not request.transport.disconnecting
    assert proxy.dropped("ghost") == 1 and proxy.count() == 1

    # Once it leaves too, the stream ends after the grace.
    request.producer.stopProducing()
    proxy.run(5.0)
    assert proxy.server.streams == {} and proxy.api.stops == ["session-1"]


def test_a_viewer_back_after_it_was_dropped_is_judged_from_its_return():
    """
    A viewer is its address and user agent, so one that was dropped as a
    ghost and comes back has the id it had: its heartbeat starts afresh at
    its return, even if it was answered as many bytes as before.
    """
    proxy, stream, viewer = started(**TIMERS)
    viewer.sent(1000)
    proxy.run(70.0)  # its bytes counted by the round at 10 s: dropped at 70 s
    assert viewer.finished and proxy.dropped("ghost") == 1
    # Back at once, answered the same bytes as the first time.
    _, back = proxy.watch(ViewerRequest())
    assert back is not viewer and back.info.id == viewer.info.id
    assert back.info.connected_at == 70.0
    back.sent(1000)
    proxy.run(50.0)  # the rounds up to 120 s: it came back 50 s ago
    assert not back.finished and proxy.dropped("ghost") == 1
    assert proxy.count() == 1 and proxy.gauge() == 1
    proxy.run(10.0)
    assert back.finished and proxy.dropped("ghost") == 2


# --- segments ------------------------------------------------------------------------


def listed(stream) -> list[Segment]:
    return result(Deferred.fromCoroutine(stream.hls.listed()))


def segment(stream, sequence: int) -> bytes:
    return result(Deferred.fromCoroutine(stream.hls.segment(sequence)))


def test_segments_are_cut_at_keyframes_at_least_the_target_apart():
    media = Media()
    proxy, stream, viewer = started(media)
    assert stream.hls.cutter is not None
    # Keyframes every 0.75 s: the first at 0, the next ones at least 2 s
    # (the target) on are at 2.25 s, 4.5 s...
    # Chunk k (fed at k/2 s) holds frames 10k..10k+9.
    proxy.run(1.5)
    assert listed(stream) == []
    proxy.run(0.5)  # frame 45 is in the chunk fed at 2 s
    assert [s.sequence for s in listed(stream)] == [0]
    proxy.run(13.0)  # 15.5 s of media: frames 0..309, segments end at 45, 90... 270
    cut = listed(stream)
    # The newest list_size, all kept since a viewer watches.
    assert [s.sequence for s in cut] == [2, 3, 4, 5]
    for s in cut:
        assert s.duration == 2.25 and s.discontinuity == 0 and not s.discontinuous
        first, end = 45 * s.sequence, 45 * (s.sequence + 1)
        assert s.psi == media.point(first)[1]
        assert segment(stream, s.sequence) == media.between(first, end)
        # Its bytes start with PAT, PMT and the keyframe's packet.
        data = segment(stream, s.sequence)
        assert len(data) % PACKET_SIZE == 0
        assert data[2 * PACKET_SIZE + 5] == 0x40  # random_access_indicator
    # Where the cuts fall inside chunks: at the keyframes' packets.
    offsets = {s.start[1] for s in cut}
    assert len(offsets) > 1 and 0 not in offsets

    playlist = result(Deferred.fromCoroutine(stream.hls.playlist())).decode()
    assert playlist == (
        "#EXTM3U\n"
        "#EXT-X-VERSION:3\n"
        "#EXT-X-TARGETDURATION:3\n"
        "#EXT-X-MEDIA-SEQUENCE:2\n"
        + "".join(f"#EXTINF:2.250,\n../hls/{KEY}/{n}.ts\n" for n in (2, 3, 4, 5))
    )
    # The store describes them for every worker, twice the list.
    stored = [Segment.decode(r) for r in result(proxy.store.segments.list(KEY))]
    assert [s.sequence for s in stored] == list(range(6)) == [s.sequence for s in stream.hls._own]

    with pytest.raises(NotFound):
        segment(stream, 6)  # not cut yet
    with pytest.raises(NotFound):
        segment(stream, 1000)


def test_a_segment_asked_for_while_watched_outlives_the_window():
    """
    The window (and the embedded store's buffer) keeps 8 s: a segment whose
    chunks left it is served from what was kept of it while the stream had
    a viewer, and is no longer available once it had none.
    """
    media = Media()
    proxy, stream, viewer = started(media)
    request = ViewerRequest()
    proxy.run(3.0)
    first = fetch_segment(proxy, request, 0)
    assert first == media.between(0, 45)

    proxy.run(10.0)
    window = stream.fanout.window
    assert window.get(1) is None and window.first_index > 1  # segment 0's chunks are gone
    assert result(proxy.store.buffer.read(KEY, 1, 1))[0][0] > 1  # and the store's
    assert fetch_segment(proxy, request, 0) == first
    assert viewer.bytes_sent == 2 * len(first)


def test_a_segment_out_of_the_window_is_gone_without_a_viewer():
    media = Media()
    proxy, stream, viewer = started(media)
    request = proxy.attach()  # a TS player keeps the stream
    viewer.abort()
    assert not stream.players.viewers
    proxy.run(3.0)
    assert segment(stream, 0) == media.between(0, 45)
    proxy.run(10.0)
    assert stream.fanout.window.get(1) is None
    assert 0 not in [s.sequence for s in listed(stream)]
    with pytest.raises(NotFound):
        segment(stream, 0)
    assert not request.transport.disconnecting


def test_a_playlist_waits_for_three_target_durations():
    """
    A playlist asked for as the stream starts is answered once it lists
    three target durations (RFC 8216's least for a live playlist), not with
    its first segment alone.
    """
    media = Media()
    proxy, stream, viewer = started(media)
    d = Deferred.fromCoroutine(stream.hls.playlist())
    # Frame 45, where the first segment ends, is fed at 2 s: one segment of
    # 2.25 s is listed, and the request waits on.
    proxy.run(2.5)
    assert not d.called and len(listed(stream)) == 1
    # Three of them are 6.75 s, at least 3 x 2 s: answered at the request's
    # next look after the third is cut.
    while len(listed(stream)) < 3:
        assert not d.called
        proxy.run(0.5)
    proxy.run(0.5)
    body = result(d).decode()
    assert "#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:2.250,\n" in body
    assert body.count("#EXTINF:2.250,") == 3


def test_a_playlist_answers_what_there_is_at_its_deadline():
    """
    A stream that went silent after one segment: at the deadline, the one
    segment is answered rather than nothing.
    """
    proxy, stream, viewer = started(Media(), no_data_timeout=60, reconnect_after=60)
    target = proxy.server.tuning.hls_target_duration
    deadline = longest_segment(target) + 2 * target
    d = Deferred.fromCoroutine(stream.hls.playlist())
    proxy.run(2.5)
    assert len(listed(stream)) == 1
    proxy.clock.pump([0.25] * int((deadline - 2.75) / 0.25))
    assert proxy.clock.seconds() == deadline - 0.25 and not d.called
    proxy.clock.advance(0.25)
    assert result(d).decode().count("#EXTINF:") == 1


def test_a_playlist_without_segments_is_unavailable_after_its_deadline():
    """
    The engine sent its first chunk, then nothing: no segment is ever cut,
    and a playlist request waits its deadline out, then is refused.
    """
    proxy, stream, viewer = started(Media(), no_data_timeout=60, reconnect_after=60)
    target = proxy.server.tuning.hls_target_duration
    deadline = longest_segment(target) + 2 * target
    assert deadline == 14.0
    d = Deferred.fromCoroutine(stream.hls.playlist())
    proxy.clock.pump([0.25] * int((deadline - 0.25) / 0.25))
    assert proxy.clock.seconds() == deadline - 0.25 and not d.called
    proxy.clock.advance(0.25)
    with pytest.raises(Unavailable) as refused:
        result(d)
    assert refused.value.retry_after == RETRY_AFTER
    assert list(stream.hls._own) == []
    assert result(proxy.store.segments.list(KEY)) == []
    assert proxy.server.streams == {KEY: stream}


def test_a_stream_without_keyframes_is_cut_at_chunk_starts():
    """
    Video that never has a keyframe (or no video at all): once twice the
    target passed without one, segments start at chunk boundaries, each at
    least the target long by arrival time, with the PAT and PMT in front.
    """
    media = Media(keyframes=False)
    proxy, stream, viewer = started(media)
    d = Deferred.fromCoroutine(stream.hls.playlist())
    # Chunk 1 at 0 s; 2 x target later (chunk 9, at 4 s) the first start;
    # a target after that (chunk 13, at 6 s) the first segment.
    proxy.run(5.5)
    assert not d.called and listed(stream) == []
    proxy.run(0.5)
    assert len(listed(stream)) == 1 and not d.called
    # Answered once three target durations are listed: after 10 s.
    proxy.run(4.5)
    body = result(d).decode()
    assert "#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:2.000,\n../hls/%s/0.ts\n" % KEY in body
    assert body.count("#EXTINF:2.000,") == 3
    first = listed(stream)[0]
    assert (first.start, first.end, first.duration) == ((9, 0), (13, 0), 2.0)
    assert psi_pids(first.psi) == [PAT_PID, PMT_PID]
    offsets = media.chunk_offsets
    assert segment(stream, 0) == first.psi + bytes(media.data[offsets[8] : offsets[12]])
    assert [(s.start, s.end) for s in listed(stream)] == [
        ((9, 0), (13, 0)),
        ((13, 0), (17, 0)),
        ((17, 0), (21, 0)),
    ]
    third = listed(stream)[2]
    assert segment(stream, 2) == third.psi + bytes(media.data[offsets[16] : offsets[20]])


def test_synthetic_data_without_video_is_cut_too():
    proxy, stream, viewer = started()
    proxy.run(6.0)
    (first,) = listed(stream)
    assert first.start == (9, 0) and first.end == (13, 0) and first.duration == 2.0
    assert segment(stream, 0) == packets(8 * 50, 4 * 50)


def test_keyframes_that_stop_get_forced_cuts_the_window_can_serve():
    """
    A keyframed stream whose keyframes stop is cut where none is once its
    segment grew to the longest allowed: 4 x target (at least 10 s), but no
    longer than the window holds (less a second), or the segment could not
    be put together from it and the playlist would list nothing.
    """
    media = Media()
    proxy, stream, viewer = started(media)
    window = stream.fanout.window
    assert window.max_seconds == 8 and longest_segment(2) == 10
    assert stream.hls.cutter.longest == 7.0
    proxy.run(4.5)  # keyframes through frame 90 (4.5 s)
    media.keyframes = False
    # Frame 90's chunk (fed at 4.5 s, chunk 10) was made with keyframes: it
    # is the last point; segments 0 (0..2.25) and 1 (2.25..4.5) are cut.
    assert [s.sequence for s in listed(stream)] == [0, 1]
    assert media.points[-1][0] == 90
    proxy.run(6.5)
    assert [s.sequence for s in listed(stream)] == [0, 1]
    proxy.run(0.5)  # the chunk at 11.5 s (chunk 24): 7 s after the keyframe's
    cut = listed(stream)
    assert [s.sequence for s in cut] == [0, 1, 2]
    forced = cut[-1]
    start, psi = media.point(90)
    assert forced.start == (10, start - media.chunk_offsets[9]) and forced.end == (24, 0)
    assert forced.duration == 7.0 and forced.psi == psi
    assert segment(stream, 2) == psi + bytes(media.data[start : media.chunk_offsets[23]])

    # Then every 7 s, at a chunk's start, each still whole in the window.
    proxy.run(7.0)
    cut = listed(stream)
    assert [s.sequence for s in cut] == [0, 1, 2, 3]
    assert (cut[-1].start, cut[-1].end, cut[-1].duration) == ((24, 0), (38, 0), 7.0)
    # Its PAT and PMT are the latest, as its first chunk carries them.
    assert psi_pids(cut[-1].psi) == [PAT_PID, PMT_PID]
    offsets = media.chunk_offsets
    assert segment(stream, 3) == cut[-1].psi + bytes(media.data[offsets[23] : offsets[37]])
    playlist = result(Deferred.fromCoroutine(stream.hls.playlist())).decode()
    assert "#EXT-X-TARGETDURATION:7\n" in playlist
    assert playlist.endswith(f"#EXTINF:7.000,\n../hls/{KEY}/3.ts\n")


# --- the routes' handlers, on the Clock ----------------------------------------------


@attrs.define(eq=False)
class RouteRequest(ViewerRequest):
    """What the HLS handlers use of a request, and the headers they set."""

    method: bytes = b"GET"
    args: dict = attrs.field(factory=dict)
    answer_headers: dict = attrs.field(factory=dict)

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.answer_headers[name] = value


def test_the_routes_serve_a_viewer_and_count_its_bytes():
    media = Media()
    proxy = Proxy.start()
    proxy.media[KEY] = media
    web = ProxyWeb(proxy.server)

    def get(handler, *args, **request):
        request = RouteRequest(**request)
        d = Deferred.fromCoroutine(handler(web, request, *args))
        return request, d

    # The first playlist request starts the stream and waits for three
    # target durations of segments.
    request, d = get(ProxyWeb.manifest, args={b"id": [KEY.encode()]})
    proxy.feed()
    assert not d.called
    (viewer,) = proxy.server.streams[KEY].players.viewers.values()
    proxy.run(7.0)
    body = result(d)
    assert body.startswith(b"#EXTM3U\n") and f"../hls/{KEY}/0.ts".encode() in body
    assert request.answer_headers[b"Content-Type"] == b"application/vnd.apple.mpegurl"
    assert request.answer_headers[b"Content-Length"] == b"%d" % len(body)
    assert viewer.bytes_sent == len(body)

    sent_before = proxy.metrics.registry.get_sample_value("aceproxy_sent_bytes_total")
    request, d = get(ProxyWeb.hls_segment, KEY, "0.ts")
    data = result(d)
    assert data == media.between(0, 45)
    assert request.answer_headers[b"Content-Type"] == b"video/mp2t"
    assert viewer.bytes_sent == len(body) + len(data)
    sent = proxy.metrics.registry.get_sample_value("aceproxy_sent_bytes_total")
    assert sent - sent_before == len(data)
    assert len(proxy.server.streams[KEY].players) == 1 and proxy.count() == 1

    # A segment never cut, or a name that is no segment's.
    with pytest.raises(NotFound):
        result(get(ProxyWeb.hls_segment, KEY, "99.ts")[1])
    with pytest.raises(NotFound):
        result(get(ProxyWeb.hls_segment, KEY, "0.m4s")[1])
    # A segment of a stream that does not play starts none.
    with pytest.raises(NotFound):
        result(get(ProxyWeb.hls_segment, OTHER, "0.ts")[1])
    assert list(proxy.server.streams) == [KEY]


def test_a_viewer_waiting_for_its_first_playlist_is_no_ghost():
    """
    A new stream's first playlist waits for three target durations of
    segments: longer, here, than the ghost timeout.  The viewer it waits
    for is heartbeated meanwhile, and gets its playlist.
    """
    proxy = Proxy.start(heartbeat_interval=1, ghost_client_timeout=3, cleanup_grace=1)
    proxy.media[KEY] = Media()
    web = ProxyWeb(proxy.server)
    request = RouteRequest(args={b"id": [KEY.encode()]})
    d = Deferred.fromCoroutine(ProxyWeb.manifest(web, request))
    proxy.feed()
    (viewer,) = proxy.server.streams[KEY].players.viewers.values()
    proxy.run(5.0)
    assert not d.called and not viewer.finished and proxy.dropped("ghost") == 0
    proxy.run(2.0)
    assert result(d).startswith(b"#EXTM3U\n")
    assert not viewer.finished and proxy.count() == 1
    # Once answered, it is judged by its requests again.
    proxy.run(5.0)
    assert viewer.finished and proxy.dropped("ghost") == 1
