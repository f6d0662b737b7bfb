"""
Tests for L{acestream_proxy.stream.keyframes}, on real MPEG-TS video made
with PyAV in the test and decoded back with PyAV.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import av.logging
import pytest

from acestream_proxy.stream.keyframes import (
    H264_VIDEO,
    HEVC_VIDEO,
    MAX_PSI_SECTION,
    MPEG2_VIDEO,
    KeyframeScanner,
    SectionReader,
    crc_valid,
)
from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID, mpeg2_crc32
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


def make_ts(codec: str = "mpeg2video", seconds: int = 4, audio_streams: int = 1) -> bytes:
    """
    A real MPEG-TS file: video at 2 Mbit/s with a keyframe every L{GOP}
    frames, and MP2 audio, muxed by libavformat's mpegts muxer.  With more
    C{audio_streams} (each with a language descriptor), listed in the PMT
    before the video, the PMT spans several packets and names the video PID
    only in a later one.
    """
    out_buffer = io.BytesIO()
    out = av.open(out_buffer, "w", format="mpegts")
    audios = []
    for number in range(audio_streams):
        audio = out.add_stream("mp2", rate=48000)
        audio.bit_rate = 128_000 if audio_streams == 1 else 32_000
        audio.layout = "stereo" if audio_streams == 1 else "mono"
        if audio_streams > 1:
            audio.metadata["language"] = "eng"
        audios.append(audio)
    video = out.add_stream(codec, rate=FPS)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.bit_rate = 2_000_000
    video.codec_context.gop_size = GOP
    if codec == "libx264":
        video.options = {"x264-params": "keyint=25:min-keyint=25:scenecut=0"}
    elif codec == "libx265":
        video.options = {"x265-params": "keyint=25:min-keyint=25:scenecut=0:open-gop=0:log-level=none"}
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
            for audio in audios:
                sound = av.AudioFrame(format="s16", layout=audio.layout, samples=samples)
                sound.planes[0].update(
                    bytes(
                        (audio_pts // 7 + i) & 0x7F
                        for i in range(samples * 2 * audio.layout.nb_channels)
                    )
                )
                sound.sample_rate = 48000
                sound.pts = audio_pts
                for packet in audio.encode(sound):
                    out.mux(packet)
            audio_pts += samples
    for packet in video.encode():
        out.mux(packet)
    for audio in audios:
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

    def test_whether_the_stream_has_video(self, mpeg2_ts: bytes) -> None:
        """
        C{has_video}, which tells a first player whether to wait for a
        random-access point: C{None} until the PMT says, unless the stream
        is bare private data (the synthetic data packets), which has none.
        """
        data = data_packets(0, 20, b"TAG1", 1.0)
        bare = KeyframeScanner()
        bare.feed(data)
        assert bare.has_video is False
        radio = KeyframeScanner()
        radio.feed(pat_packet(0) + data)
        assert radio.has_video is None
        radio.feed(pmt_packet(0) + data)
        assert radio.has_video is False
        bare.feed(pat_packet(0) + pmt_packet(0))
        assert bare.has_video is False and bare.pmt is not None

        scanner, found = scan(mpeg2_ts)
        video = KeyframeScanner()
        video.feed(mpeg2_ts[found[0] + PACKET_SIZE :][:PACKET_SIZE])
        assert video.has_video is None
        video.feed(scanner.pat + scanner.pmt)
        assert video.has_video is True

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


def section(table_id: int, body: bytes) -> bytes:
    """A long-form PSI section around C{body}, with its MPEG-2 CRC."""
    head = struct.pack(">BH", table_id, 0xB000 | (len(body) + 4))
    return head + body + struct.pack(">I", mpeg2_crc32(head + body))


def pmt_section(program: int, streams: list[tuple[int, int, bytes]]) -> bytes:
    """A PMT section listing C{(stream_type, pid, descriptors)}."""
    body = struct.pack(">HBBBHH", program, 0xC1, 0, 0, 0xE000 | streams[0][1], 0xF000)
    for stream_type, pid, descriptors in streams:
        body += struct.pack(">BHH", stream_type, 0xE000 | pid, 0xF000 | len(descriptors))
        body += descriptors
    return section(0x02, body)


def packetize(pid: int, sections: list[bytes], lead: bytes = b"", cc: int = 0) -> list[bytes]:
    """
    C{sections} back to back in packets of C{pid}, as a muxer writes them:
    a packet in which one starts has payload_unit_start_indicator and a
    pointer_field (past C{lead}, the end of an earlier section); the last
    is padded with stuffing.
    """
    stream = lead + b"".join(sections)
    starts, offset = [], len(lead)
    for one in sections:
        starts.append(offset)
        offset += len(one)
    packets, position = [], 0
    while position < len(stream):
        first = next((s for s in starts if position <= s < position + 183), None)
        if first is not None:
            payload = bytes([first - position]) + stream[position : position + 183]
            position += 183
        else:
            later = next((s for s in starts if s > position), len(stream))
            take = min(184, later - position)
            payload = stream[position : position + take]
            position += take
        header = bytes(
            [0x47, (0x40 if first is not None else 0) | pid >> 8, pid & 0xFF, 0x10 | cc & 0xF]
        )
        packets.append(header + payload + b"\xff" * (184 - len(payload)))
        cc += 1
    return packets


def read_all(reader: SectionReader, packets: list[bytes]) -> list:
    return [found for packet in packets for found in reader.feed(packet)]


#: A language descriptor: what makes a PMT with many audio streams long.
_LANGUAGE = b"\x0a\x04eng\x00"


def long_pmt(program: int = 1, video_pid: int = 0x300, audios: int = 40) -> bytes:
    """A PMT naming its video PID after C{audios} audio streams."""
    streams = [(0x03, 0x200 + n, _LANGUAGE * 3) for n in range(audios)]
    return pmt_section(program, streams + [(MPEG2_VIDEO, video_pid, b"")])


class TestSectionReader:
    def test_a_section_over_several_packets(self) -> None:
        """
        A section is gathered from its packets, past the pointer_field's
        end of an earlier one; the next section, begun in its last packet,
        comes with that packet too.
        """
        first, second = long_pmt(), long_pmt(video_pid=0x301)
        assert len(first) > 3 * 184
        packets = packetize(0x1000, [first, second], lead=b"\x11" * 30)
        found = read_all(SectionReader(0x02), packets)
        assert [one for one, _ in found] == [first, second]
        (_, carrying_first), (_, carrying_second) = found
        assert b"".join(carrying_first + carrying_second[1:]) == b"".join(packets)
        assert carrying_first[-1] == carrying_second[0]

    def test_a_header_split_over_two_packets(self) -> None:
        """A section whose first bytes end one packet goes on in the next."""
        filler = section(0x02, b"\x00" * (183 - 2 - 4 - 3))
        assert len(filler) == 181
        target = long_pmt(audios=3)
        packets = packetize(0x1000, [filler, target])
        assert len(packets) == 2 and packets[0][-2:] == target[:2]
        found = read_all(SectionReader(0x02), packets)
        assert [one for one, _ in found][-1] == target

    def test_a_missing_packet_drops_the_section(self) -> None:
        """A gap in the continuity counter: that copy is lost, not misread."""
        table = long_pmt()
        packets = packetize(0x1000, [table])
        again = packetize(0x1000, [table], cc=len(packets))
        reader = SectionReader(0x02)
        assert read_all(reader, packets[:1] + packets[2:]) == []
        assert read_all(reader, again) == [(table, tuple(again))]

    def test_a_packet_sent_twice_counts_once(self) -> None:
        table = long_pmt()
        packets = packetize(0x1000, [table])
        doubled = packets[:2] + packets[1:]
        assert read_all(SectionReader(0x02), doubled) == [(table, tuple(packets))]

    def test_a_bad_crc_is_ignored(self) -> None:
        table = bytearray(long_pmt())
        table[200] ^= 0x01
        assert read_all(SectionReader(0x02), packetize(0x1000, [bytes(table)])) == []

    def test_other_tables_are_passed_over(self) -> None:
        """A section of another table before the wanted one, in one packet."""
        other = section(0xC0, b"\x00" * 40)
        table = long_pmt(audios=2)
        packets = packetize(0x1000, [other, table])
        assert len(packets) == 1
        assert read_all(SectionReader(0x02), packets) == [(table, tuple(packets))]

    def test_sections_are_bounded(self) -> None:
        """
        The longest PAT or PMT section is read; a longer one is junk even
        with a good CRC, and so are its packets after it.
        """
        longest = section(0x02, b"\x00" * (MAX_PSI_SECTION - 3 - 4))
        too_long = section(0x02, b"\x00" * (MAX_PSI_SECTION - 3 - 4 + 1))
        assert len(longest) == MAX_PSI_SECTION
        reader = SectionReader(0x02)
        assert [one for one, _ in read_all(reader, packetize(0x1000, [longest]))] == [longest]
        assert read_all(reader, packetize(0x1000, [too_long], cc=6)) == []

    def test_crc_check_matches_the_reference(self) -> None:
        """A section ending with its MPEG-2 CRC passes; one flipped bit fails it."""
        for size in range(1, 300, 7):
            body = bytes((n * 37 + size) & 0xFF for n in range(size))
            good = body + struct.pack(">I", mpeg2_crc32(body))
            assert crc_valid(good)
            for flip in (0, size // 2, size + 3):
                bad = bytearray(good)
                bad[flip] ^= 0x10
                assert not crc_valid(bytes(bad))


@pytest.fixture(scope="module")
def long_pmt_ts() -> bytes:
    """Real video whose PMT, from libavformat, takes several packets."""
    return make_ts("mpeg2video", seconds=3, audio_streams=30)


def pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


def tables_on(data: bytes, table_pid: int) -> list[list[bytes]]:
    """The packets of C{table_pid}, grouped from each packet that starts one."""
    groups: list[list[bytes]] = []
    for start in range(0, len(data), PACKET_SIZE):
        packet = data[start : start + PACKET_SIZE]
        if pid(packet) != table_pid:
            continue
        if packet[1] & 0x40 or not groups:
            groups.append([])
        groups[-1].append(packet)
    return groups


class TestLongTables:
    def test_video_named_in_a_later_packet_of_the_pmt(self, long_pmt_ts: bytes) -> None:
        """
        The video stream is listed after 30 audio streams, beyond the PMT's
        first packet: its PID and every keyframe are still found.
        """
        scanner, found = scan(long_pmt_ts)
        with av.open(io.BytesIO(long_pmt_ts)) as container:
            assert len(container.streams.audio) == 30
            video_pid = container.streams.video[0].id
        assert scanner.video_pid == video_pid and scanner.stream_type == MPEG2_VIDEO
        pmts = tables_on(long_pmt_ts, scanner.pmt_pid)
        assert all(len(group) == 2 for group in pmts)
        entry = bytes([MPEG2_VIDEO, 0xE0 | video_pid >> 8, video_pid & 0xFF])
        assert entry not in pmts[0][0] and entry in pmts[0][1]
        assert len(found) == keyframe_count(long_pmt_ts) == 3

    def test_psi_holds_every_packet_of_the_tables(self, long_pmt_ts: bytes) -> None:
        """
        What a joining player gets in front is the whole latest PAT and
        PMT, and with it the stream decodes cleanly from a keyframe.
        """
        scanner, found = scan(long_pmt_ts)
        psi = scanner.psi
        pat = tables_on(long_pmt_ts, PAT_PID)[-1]
        pmt = tables_on(long_pmt_ts, scanner.pmt_pid)[-1]
        assert psi == b"".join(pat + pmt)
        assert len(psi) == 3 * PACKET_SIZE
        errors, frames, packets, first_is_key = decode(psi + long_pmt_ts[found[1] :])
        assert (errors, frames, first_is_key) == (0, packets, True)

    def test_a_table_split_between_runs(self, long_pmt_ts: bytes) -> None:
        """A run that ends inside the PMT: the next run finishes it."""
        _, expected = scan(long_pmt_ts)
        first_pmt = next(
            start
            for start in range(0, len(long_pmt_ts), PACKET_SIZE)
            if long_pmt_ts[start + 1] & 0x40 and pid(long_pmt_ts[start:]) not in (0, 0x11)
        )
        scanner = KeyframeScanner()
        assert scanner.feed(long_pmt_ts[: first_pmt + PACKET_SIZE]) == ()
        assert scanner.video_pid is None and scanner.pmt_pid is not None
        rest = long_pmt_ts[first_pmt + PACKET_SIZE :]
        found = [first_pmt + PACKET_SIZE + offset for offset in scanner.feed(rest)]
        assert scanner.video_pid is not None
        assert found == expected

    def test_a_damaged_pmt_does_not_move_the_video(self, long_pmt_ts: bytes) -> None:
        """
        A PMT copy whose video entry names another PID, CRC not fixed, is
        ignored: the video PID and the kept PMT stay; the same change with
        its CRC made right is taken.
        """
        scanner, found = scan(long_pmt_ts)
        video = scanner.video_pid
        kept = scanner.pmt
        reader = SectionReader(0x02)
        table = read_all(reader, tables_on(long_pmt_ts, scanner.pmt_pid)[-1])[0][0]
        entry = bytes([MPEG2_VIDEO, 0xE0 | video >> 8, video & 0xFF])
        assert table.count(entry) == 1
        moved = table.replace(entry, bytes([MPEG2_VIDEO, 0xE0 | video >> 8, (video + 1) & 0xFF]))
        damaged = b"".join(packetize(scanner.pmt_pid, [moved], cc=3))
        keyframe = long_pmt_ts[found[1] : found[1] + PACKET_SIZE]
        assert scanner.feed(damaged + keyframe) == (len(damaged),)
        assert (scanner.video_pid, scanner.pmt) == (video, kept)
        fresh = KeyframeScanner()
        fresh.feed(scanner.pat + damaged)
        assert fresh.pat == scanner.pat and fresh.pmt is None and fresh.video_pid is None

        mended = section(0x02, moved[3:-4])
        scanner.feed(b"".join(packetize(scanner.pmt_pid, [mended], cc=5)))
        assert scanner.video_pid == video + 1
