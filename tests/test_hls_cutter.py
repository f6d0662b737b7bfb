"""
Tests for the cutting of a stream into HLS segments (L{acestream_proxy.hls}):
where the owner cuts, how long it says each segment is, how numbering and
discontinuities go on across engine sessions and owners, the record kept in
the store, the bytes put together from chunks and the playlist.
"""

from __future__ import annotations

import attrs

from acestream_proxy.hls.cutter import SegmentCutter, longest_segment
from acestream_proxy.hls.playlist import render
from acestream_proxy.hls.segment import Segment
from acestream_proxy.stream.mpegts import PACKET_SIZE, pes_pts
from acestream_proxy.stream.window import Chunk

VIDEO_PID = 0x100
PSI = b"\x47\x40\x00\x10" + b"\xff" * 184 + b"\x47\x50\x00\x10" + b"\xff" * 184
KEY = "ab" * 20


def pes_packet(pts: int | None, counter: int = 0) -> bytes:
    """A video packet that starts a PES packet, with C{pts} if given."""
    header = bytes([0x47, 0x40 | VIDEO_PID >> 8, VIDEO_PID & 0xFF, 0x10 | counter & 0xF])
    if pts is None:
        pes = b"\x00\x00\x01\xe0\x00\x00\x80\x00\x00"
    else:
        stamp = bytes(
            [
                0x21 | ((pts >> 29) & 0x0E),
                (pts >> 22) & 0xFF,
                0x01 | ((pts >> 14) & 0xFE),
                (pts >> 7) & 0xFF,
                0x01 | ((pts << 1) & 0xFE),
            ]
        )
        pes = b"\x00\x00\x01\xe0\x00\x00\x80\x80\x05" + stamp
    return (header + pes).ljust(PACKET_SIZE, b"\xff")


def filler(counter: int = 0) -> bytes:
    return bytes([0x47, VIDEO_PID >> 8, VIDEO_PID & 0xFF, 0x10 | counter & 0xF]).ljust(
        PACKET_SIZE, b"\x00"
    )


@attrs.define
class Feed:
    """Chunks of video, numbered on, fed to a cutter; what it published."""

    target: float = 2.0
    index: int = 0
    published: list = attrs.field(factory=list)
    cutter: SegmentCutter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.cutter = SegmentCutter(self.target, self.published.append)

    def chunk(self, at: float, keyframe_pts=(), packets: int = 4, psi: bool = True) -> Chunk:
        """
        A chunk of C{packets} packets arriving C{at}, whose first ones are
        keyframes with the given time stamps (L{None}: a keyframe whose PES
        has no PTS).
        """
        self.index += 1
        data = b"".join(pes_packet(pts) for pts in keyframe_pts)
        data += b"".join(filler(n) for n in range(packets - len(keyframe_pts)))
        access = tuple(n * PACKET_SIZE for n in range(len(keyframe_pts)))
        chunk = Chunk.make(self.index, data, at, access, PSI if access and psi else b"")
        self.cutter(chunk)
        return chunk


def test_pes_pts_reads_the_time_stamp():
    assert pes_pts(pes_packet(0)) == 0
    assert pes_pts(pes_packet(123_456_789)) == 123_456_789
    assert pes_pts(pes_packet((1 << 33) - 1)) == (1 << 33) - 1
    assert pes_pts(pes_packet(None)) is None
    assert pes_pts(filler()) is None
    assert pes_pts(pes_packet(90_000)[:100]) is None


def test_cut_at_the_first_keyframe_a_target_after_the_start():
    feed = Feed(target=2.0)
    # A keyframe a second, stamped one second apart; arrival times are off
    # (bursts), which the time stamps override.
    for second in range(7):
        feed.chunk(at=100 + second * 0.5, keyframe_pts=[90_000 * (second + 1)])
    assert [(s.sequence, s.start, s.end, s.duration) for s in feed.published] == [
        (0, (1, 0), (3, 0), 2.0),
        (1, (3, 0), (5, 0), 2.0),
        (2, (5, 0), (7, 0), 2.0),
    ]
    assert all(s.psi == PSI and not s.discontinuous for s in feed.published)


def test_a_cut_may_fall_inside_a_chunk():
    feed = Feed(target=1.0)
    feed.chunk(at=0, keyframe_pts=[0])
    feed.chunk(at=0.5, keyframe_pts=[])
    chunk = feed.chunk(at=1.0, keyframe_pts=[], packets=3)
    # A chunk with a keyframe on its third packet.
    data = filler() + filler() + pes_packet(90_000) + filler()
    chunk = Chunk.make(chunk.index + 1, data, 1.2, (2 * PACKET_SIZE,), PSI)
    feed.cutter(chunk)
    [segment] = feed.published
    assert segment.start == (1, 0)
    assert segment.end == (4, 2 * PACKET_SIZE)
    assert segment.chunks == 4
    assert segment.duration == 1.0


def test_without_time_stamps_the_arrival_times_tell_the_duration():
    feed = Feed(target=2.0)
    for n in range(5):
        feed.chunk(at=10 + n * 1.25, keyframe_pts=[None])
    assert [(s.start, s.end, s.duration) for s in feed.published] == [
        ((1, 0), (3, 0), 2.5),
        ((3, 0), (5, 0), 2.5),
    ]


def test_a_jump_in_the_time_stamps_is_a_discontinuity():
    feed = Feed(target=2.0)
    feed.chunk(at=0, keyframe_pts=[5_000_000])
    feed.chunk(at=0.8, keyframe_pts=[5_090_000])
    # The stamps went back (the broadcast was spliced): the segment ends
    # here, however short, timed by arrival...
    feed.chunk(at=1.5, keyframe_pts=[90_000])
    feed.chunk(at=2.5, keyframe_pts=[180_000])
    feed.chunk(at=3.5, keyframe_pts=[270_000])
    # ... as it does where they leap ahead.
    feed.chunk(at=4.5, keyframe_pts=[90_000_000])
    got = [(s.start, s.end, s.duration, s.discontinuity, s.discontinuous) for s in feed.published]
    assert got == [
        ((1, 0), (3, 0), 1.5, 0, False),
        ((3, 0), (5, 0), 2.0, 1, True),
        ((5, 0), (6, 0), 1.0, 1, False),
    ]
    feed.chunk(at=5.5, keyframe_pts=[90_090_000])
    feed.chunk(at=6.5, keyframe_pts=[90_180_000])
    assert feed.published[-1].discontinuous and feed.published[-1].discontinuity == 2


def test_time_stamps_wrap_around():
    feed = Feed(target=2.0)
    top = 1 << 33
    feed.chunk(at=0, keyframe_pts=[top - 90_000])
    feed.chunk(at=1, keyframe_pts=[0])
    feed.chunk(at=2, keyframe_pts=[90_000])
    [segment] = feed.published
    assert segment.duration == 2.0


def test_a_stream_without_keyframes_is_cut_at_chunk_starts():
    feed = Feed(target=2.0)
    # It waits a little for a keyframe before starting a segment at all...
    for n in range(4):
        feed.chunk(at=n, keyframe_pts=[])
    assert feed.published == []
    for n in range(4, 12):
        feed.chunk(at=n, keyframe_pts=[])
    # ... then starts at a chunk and cuts every target.
    assert [(s.start, s.end, s.duration, s.psi) for s in feed.published] == [
        ((5, 0), (7, 0), 2.0, b""),
        ((7, 0), (9, 0), 2.0, b""),
        ((9, 0), (11, 0), 2.0, b""),
    ]


def test_keyframes_too_far_apart_get_one_cut_between():
    feed = Feed(target=2.0)
    longest = longest_segment(2.0)
    feed.chunk(at=0, keyframe_pts=[0])
    at = 0.0
    while not feed.published:
        at += 1
        feed.chunk(at=at, keyframe_pts=[])
    [segment] = feed.published
    assert segment.duration == longest
    assert segment.end == (feed.index, 0)
    # Keyframes that come again are cut at again, a target after that cut.
    feed.chunk(at=at + 1, keyframe_pts=[int(90_000 * (at + 1))])
    assert len(feed.published) == 1
    feed.chunk(at=at + 2, keyframe_pts=[int(90_000 * (at + 2))])
    assert [(s.start, s.end, s.duration) for s in feed.published[1:]] == [
        ((feed.index - 2, 0), (feed.index, 0), 2.0)
    ]


def test_a_new_engine_session_ends_the_segment_and_marks_a_discontinuity():
    feed = Feed(target=2.0)
    for n in range(3):
        feed.chunk(at=n, keyframe_pts=[90_000 * n])
    assert [s.sequence for s in feed.published] == [0]
    feed.cutter.new_session()
    # The new session's stamps start elsewhere; its first keyframe ends the
    # segment under way at once, however short, timed by arrival.
    feed.chunk(at=2.5, keyframe_pts=[7_000_000])
    for n in range(1, 4):
        feed.chunk(at=2.5 + n, keyframe_pts=[7_000_000 + 90_000 * n])
    got = [(s.sequence, s.duration, s.discontinuity, s.discontinuous) for s in feed.published]
    assert got == [(0, 2.0, 0, False), (1, 0.5, 0, False), (2, 2.0, 1, True)]


def test_numbering_goes_on_after_a_previous_owner():
    feed = Feed(target=2.0)
    previous = Segment(41, (7, 0), (9, 0), 2.0, discontinuity=3)
    feed.cutter.resume_after(previous)
    for n in range(5):
        feed.chunk(at=n, keyframe_pts=[90_000 * n])
    first, second = feed.published
    assert (first.sequence, first.discontinuity, first.discontinuous) == (42, 4, True)
    assert (second.sequence, second.discontinuity, second.discontinuous) == (43, 4, False)


def test_a_first_owner_marks_no_discontinuity():
    feed = Feed(target=2.0)
    feed.cutter.resume_after(None)
    feed.cutter.new_session()  # the first session opening
    for n in range(3):
        feed.chunk(at=n, keyframe_pts=[90_000 * n])
    [segment] = feed.published
    assert (segment.sequence, segment.discontinuity, segment.discontinuous) == (0, 0, False)


def test_the_record_survives_the_store():
    segment = Segment(7, (3, 376), (9, 0), 2.002, 2, True, PSI)
    text = segment.encode()
    assert isinstance(text, str)
    assert Segment.decode(text) == segment
    assert Segment.decode(text.encode()) == segment
    for junk in ["", "[]", "not json", '[1, 2, 3, 4, 5, 6, 7, 8, "***"]', "null"]:
        assert Segment.decode(junk) is None


def test_bytes_are_the_psi_then_the_packets_between_the_points():
    packets = [bytes([n]) * PACKET_SIZE for n in range(12)]
    chunks = [b"".join(packets[0:4]), b"".join(packets[4:8]), b"".join(packets[8:12])]
    segment = Segment(0, (1, 2 * PACKET_SIZE), (3, 1 * PACKET_SIZE), 2.0, psi=PSI)
    assert segment.chunks == 3
    assert segment.cut(chunks) == PSI + b"".join(packets[2:9])
    # Ending on a chunk boundary: the last chunk is whole.
    segment = Segment(0, (1, 0), (3, 0), 2.0, psi=PSI)
    assert segment.chunks == 2
    assert segment.cut(chunks[:2]) == PSI + b"".join(packets[0:8])
    # Inside one chunk.
    segment = Segment(0, (1, PACKET_SIZE), (1, 3 * PACKET_SIZE), 2.0)
    assert segment.chunks == 1
    assert segment.cut([memoryview(chunks[0])]) == b"".join(packets[1:3])


def test_the_playlist():
    segments = [
        Segment(5, (1, 0), (2, 0), 2.0, 0),
        Segment(6, (2, 0), (3, 0), 3.2, 0),
        Segment(7, (3, 0), (4, 0), 2.0, 1, True),
    ]
    assert render(KEY, segments, 2.0).decode().splitlines() == [
        "#EXTM3U",
        "#EXT-X-VERSION:3",
        "#EXT-X-TARGETDURATION:4",
        "#EXT-X-MEDIA-SEQUENCE:5",
        "#EXTINF:2.000,",
        f"../hls/{KEY}/5.ts",
        "#EXTINF:3.200,",
        f"../hls/{KEY}/6.ts",
        "#EXT-X-DISCONTINUITY",
        "#EXTINF:2.000,",
        f"../hls/{KEY}/7.ts",
    ]


def test_the_playlist_counts_discontinuities_that_slid_out():
    segments = [Segment(9, (1, 0), (2, 0), 2.0, 3, True), Segment(10, (2, 0), (3, 0), 2.0, 3)]
    lines = render(KEY, segments, 2.0).decode().splitlines()
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:2" in lines
    assert lines.index("#EXT-X-DISCONTINUITY") < lines.index(f"../hls/{KEY}/9.ts")
    segments = [Segment(10, (2, 0), (3, 0), 2.0, 3)]
    lines = render(KEY, segments, 2.0).decode().splitlines()
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:3" in lines
    assert "#EXT-X-DISCONTINUITY" not in lines
    # A duration just over a whole second is not rounded up by a float's
    # noise, only by a real excess.
    assert b"#EXT-X-TARGETDURATION:2\n" in render(KEY, [Segment(0, (1, 0), (2, 0), 2.0002)], 2.0)
    assert b"#EXT-X-TARGETDURATION:3\n" in render(KEY, [Segment(0, (1, 0), (2, 0), 2.01)], 2.0)
