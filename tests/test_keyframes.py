"""
Tests for L{acestream_proxy.stream.keyframes}, on real MPEG-TS video made
with PyAV in the test and decoded back with PyAV.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import av.logging
import pytest

from acestream_proxy.stream.keyframes import (
    H264_VIDEO,
    HEVC_VIDEO,
    MPEG2_VIDEO,
    KeyframeScanner,
)
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing.synthetic import data_packets, pat_packet, pmt_packet

WIDTH, HEIGHT, FPS, GOP = 320, 240, 25, 25
#: The writer's chunks are about this big (48 KiB, in whole packets).
CHUNK = PACKET_SIZE * 261

_PATTERN = bytes(range(256)) * 4


def _plane(plane, frame: int, shift: int) -> bytes:
    """A moving diagonal ramp, testsrc-like: every frame differs."""
    width = plane.line_size
    return b"".join(
        _PATTERN[(frame * 3 + row * 2 + shift) % 256 :][:width]
        for row in range(plane.height)
    )


def make_ts(codec: str = "mpeg2video", seconds: int = 4) -> bytes:
    """
    A real MPEG-TS file: video at 2 Mbit/s with a keyframe every L{GOP}
    frames, and MP2 audio, muxed by libavformat's mpegts muxer.
    """
    out_buffer = io.BytesIO()
    out = av.open(out_buffer, "w", format="mpegts")
    video = out.add_stream(codec, rate=FPS)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.bit_rate = 2_000_000
    video.codec_context.gop_size = GOP
    if codec == "libx264":
        video.options = {"x264-params": "keyint=25:min-keyint=25:scenecut=0"}
    elif codec == "libx265":
        video.options = {"x265-params": "keyint=25:min-keyint=25:scenecut=0:open-gop=0:log-level=none"}
    audio = out.add_stream("mp2", rate=48000)
    audio.bit_rate = 128_000
    samples = 1152
    audio_pts = 0
    for number in range(seconds * FPS):
        frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
        for shift, plane in enumerate(frame.planes):
            plane.update(_plane(plane, number, shift * 40))
        frame.pts = number
        frame.time_base = Fraction(1, FPS)
        for packet in video.encode(frame):
            out.mux(packet)
        while audio_pts < (number + 1) * 48000 // FPS:
            sound = av.AudioFrame(format="s16", layout="stereo", samples=samples)
            sound.planes[0].update(bytes((audio_pts // 7 + i) & 0x7F for i in range(samples * 4)))
            sound.sample_rate = 48000
            sound.pts = audio_pts
            for packet in audio.encode(sound):
                out.mux(packet)
            audio_pts += samples
    for packet in video.encode():
        out.mux(packet)
    for packet in audio.encode():
        out.mux(packet)
    out.close()
    data = out_buffer.getvalue()
    assert data and len(data) % PACKET_SIZE == 0
    return data


@pytest.fixture(scope="module")
def mpeg2_ts() -> bytes:
    return make_ts("mpeg2video")


def keyframe_count(data: bytes) -> int:
    """How many keyframes PyAV's demuxer sees in the video stream."""
    with av.open(io.BytesIO(data)) as container:
        return sum(
            1
            for packet in container.demux(container.streams.video[0])
            if packet.size and packet.is_keyframe
        )


def scan(data: bytes, run: int = CHUNK) -> tuple[KeyframeScanner, list[int]]:
    """Feed C{data} run by run as the writer would; the absolute offsets."""
    scanner = KeyframeScanner()
    found = []
    for start in range(0, len(data), run):
        found += [start + offset for offset in scanner.feed(data[start : start + run])]
    return scanner, found


def decode(body: bytes) -> tuple[int, int, int, bool]:
    """
    Decode every video packet of C{body}.

    @return: The errors (exceptions plus libav messages at error level),
        frames decoded, video packets demuxed, and whether the first frame
        decoded is a keyframe.
    """
    errors = frames = packets = 0
    first_is_key = False
    av.logging.set_level(av.logging.VERBOSE)
    # Each message as it comes: a repeat held back to be summed would be
    # told only with the next message, in another test's capture.
    skip_repeated = av.logging.get_skip_repeated()
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture() as logs:
            with av.open(io.BytesIO(body)) as container:
                stream = container.streams.video[0]
                for packet in container.demux(stream):
                    if not packet.size:
                        continue
                    packets += 1
                    try:
                        decoded = packet.decode()
                    except av.error.FFmpegError:
                        errors += 1
                        continue
                    if decoded and not frames:
                        first_is_key = decoded[0].key_frame
                    frames += len(decoded)
                frames += len(stream.codec_context.decode(None))
    finally:
        av.logging.set_level(None)
        av.logging.set_skip_repeated(skip_repeated)
    errors += sum(1 for level, _, _ in logs if level <= av.logging.ERROR)
    return errors, frames, packets, first_is_key


def strip_random_access_indicator(data: bytes) -> bytes:
    """The same stream with every adaptation field's RAI cleared."""
    packets = bytearray(data)
    for start in range(0, len(packets), PACKET_SIZE):
        if packets[start + 3] & 0x20 and packets[start + 4]:
            packets[start + 5] &= ~0x40 & 0xFF
    return bytes(packets)


class TestScanner:
    def test_finds_every_keyframe(self, mpeg2_ts: bytes) -> None:
        """One random-access point per keyframe, all on the video PID."""
        scanner, found = scan(mpeg2_ts)
        assert scanner.stream_type == MPEG2_VIDEO
        assert len(found) == keyframe_count(mpeg2_ts) == 4
        for offset in found:
            packet = mpeg2_ts[offset : offset + PACKET_SIZE]
            assert ((packet[1] & 0x1F) << 8 | packet[2]) == scanner.video_pid

    def test_keeps_pat_and_pmt(self, mpeg2_ts: bytes) -> None:
        scanner, _ = scan(mpeg2_ts)
        assert scanner.pat is not None and scanner.pat[1:3] == b"\x40\x00"
        assert scanner.pmt is not None
        assert ((scanner.pmt[1] & 0x1F) << 8 | scanner.pmt[2]) == scanner.pmt_pid
        assert scanner.pat in mpeg2_ts and scanner.pmt in mpeg2_ts

    def test_run_size_does_not_matter(self, mpeg2_ts: bytes) -> None:
        """Runs of one packet, odd sizes and the whole file agree."""
        _, chunked = scan(mpeg2_ts)
        assert scan(mpeg2_ts, PACKET_SIZE)[1] == chunked
        assert scan(mpeg2_ts, PACKET_SIZE * 7)[1] == chunked
        assert scan(mpeg2_ts, len(mpeg2_ts))[1] == chunked

    def test_sequence_header_without_the_flag(self, mpeg2_ts: bytes) -> None:
        """With no random_access_indicator, the PES starts still show them."""
        stripped = strip_random_access_indicator(mpeg2_ts)
        assert stripped != mpeg2_ts
        assert scan(stripped)[1] == scan(mpeg2_ts)[1]

    @pytest.mark.parametrize(
        "codec, stream_type", [("libx264", H264_VIDEO), ("libx265", HEVC_VIDEO)]
    )
    def test_h264_and_hevc(self, codec: str, stream_type: int) -> None:
        """IDR and IRAP pictures are found, with or without the flag."""
        data = make_ts(codec, seconds=3)
        scanner, found = scan(data)
        assert scanner.stream_type == stream_type
        assert len(found) == keyframe_count(data) == 3
        assert scan(strip_random_access_indicator(data))[1] == found
        errors, frames, packets, first_is_key = decode(
            scanner.pat + scanner.pmt + data[found[1] :]
        )
        assert (errors, frames, first_is_key) == (0, packets, True)

    def test_synthetic_stream_has_none(self) -> None:
        """No video PID (private data only): no random-access points."""
        data = b"".join(
            pat_packet(n) + pmt_packet(n) + data_packets(n * 50, 50, b"TAG1", 1.0 + n)
            for n in range(20)
        )
        scanner, found = scan(data)
        assert found == []
        assert scanner.video_pid is None
        assert scanner.pat == pat_packet(19) and scanner.pmt == pmt_packet(19)

    def test_video_before_its_pmt_is_not_reported(self, mpeg2_ts: bytes) -> None:
        """
        A keyframe before any PAT and PMT is not reported (no player could
        use it without them); once they have been seen, it is.
        """
        scanner, found = scan(mpeg2_ts)
        keyframe = mpeg2_ts[found[1] : found[1] + PACKET_SIZE]
        fresh = KeyframeScanner()
        assert fresh.feed(keyframe) == ()
        assert fresh.feed(scanner.pat + scanner.pmt + keyframe) == (2 * PACKET_SIZE,)


class TestDecoding:
    def test_cut_at_random_access_point_decodes_cleanly(self, mpeg2_ts: bytes) -> None:
        """
        A cut at a found point, with the kept PAT and PMT in front, decodes
        every frame without an error; a cut between points does not.
        """
        scanner, found = scan(mpeg2_ts)
        for offset in found[1:]:
            errors, frames, packets, first_is_key = decode(
                scanner.pat + scanner.pmt + mpeg2_ts[offset:]
            )
            assert (errors, frames, first_is_key) == (0, packets, True)
            cut = offset + 40 * PACKET_SIZE
            bad_errors, bad_frames, bad_packets, _ = decode(
                scanner.pat + scanner.pmt + mpeg2_ts[cut:]
            )
            assert bad_errors > 0 or bad_frames < bad_packets
            assert bad_packets - bad_frames > packets - frames
