"""
Tests for the demo's broadcast (L{acestream_proxy.testing.demo_media}): a
picture and a tone a player can decode, with the synthetic data packets
beside them, played by the simulated engine through the proxy and decoded
with PyAV (libavformat and libavcodec, as in VLC and mpv).  Each coding
(H.264 and AAC, MPEG-2 and MP2) is checked alike.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import av.logging
import pytest
import pytest_twisted

from acestream_proxy.stream.keyframes import KeyframeScanner
from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID
from acestream_proxy.testing import demo, demo_media, synthetic
from acestream_proxy.testing.engine import content_tag
from acestream_proxy.testing.source import TsSource, data_positions, load

from .support import HASHES, Player, start_engine

SECONDS = 4
KEY = HASHES[0]

#: What libavcodec decodes each coding's video and audio with, the samples
#: in one of its audio frames, and the PMT stream types of its video and
#: audio (ISO/IEC 13818-1: 0x1B H.264, 0x0F AAC in ADTS, 0x02 MPEG-2
#: video, 0x03 MPEG-1 audio layers I-III).
EXPECTED = {
    "h264": ({"video": "h264", "audio": "aac"}, 1024, (0x1B, 0x0F)),
    "mpeg2": ({"video": "mpeg2video", "audio": "mp2"}, 1152, (0x02, 0x03)),
}
#: The stream type the data PID is declared with: private data, with a
#: KLVA registration descriptor.
PRIVATE_DATA = 0x06


@pytest.fixture(scope="module", params=sorted(demo_media.CODINGS))
def coding(request) -> demo_media.Coding:
    return demo_media.CODINGS[request.param]


@pytest.fixture(scope="module")
def media(tmp_path_factory, coding) -> Path:
    path = tmp_path_factory.mktemp("media") / coding.file_name
    demo_media.generate(path, seconds=SECONDS, coding=coding)
    return path


def errors(logs) -> list:
    """
    The captured messages but the demuxer's note that the data stream has
    no timestamps to estimate the duration by (it has none: it is data).
    """
    return [entry for entry in logs if "is not set in estimate_timings_from_pts" not in entry[2]]


def pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


def decode(data: bytes) -> dict:
    """Demux and decode C{data}: the streams found and frames per type."""
    with av.open(io.BytesIO(data), format="mpegts") as container:
        found = {stream.type: stream for stream in container.streams}
        codecs = {
            kind: stream.codec_context.name
            for kind, stream in found.items()
            if kind in ("video", "audio")
        }
        data_pid = found["data"].id if "data" in found else None
        data_codec = found["data"].name if "data" in found else None
        counts = {"video": 0, "audio": 0, "keyframe_first": None}
        for frame in container.decode(video=0, audio=0):
            kind = "video" if isinstance(frame, av.VideoFrame) else "audio"
            if kind == "video" and counts["keyframe_first"] is None:
                counts["keyframe_first"] = frame.key_frame
            counts[kind] += 1
    return {"codecs": codecs, "data_pid": data_pid, "data_codec": data_codec, **counts}


def stream_types(data: bytes) -> dict[int, int]:
    """
    Each elementary PID of the first PMT in C{data} with its stream type,
    read from the packets themselves (each section fits in one packet).
    """

    def section(packet: bytes) -> bytes:
        start = 4 + (1 + packet[4] if packet[3] & 0x20 else 0)
        body = packet[start + 1 + packet[start] :]  # past the pointer field
        return body[: 3 + (((body[1] & 0x0F) << 8) | body[2])]

    packets = [data[i : i + PACKET_SIZE] for i in range(0, len(data), PACKET_SIZE)]
    pat = section(next(p for p in packets if pid(p) == PAT_PID))
    # The PAT's first program (past its 8-byte header), its PMT PID.
    pmt_pid = ((pat[10] & 0x1F) << 8) | pat[11]
    pmt = section(next(p for p in packets if pid(p) == pmt_pid))
    assert pmt[0] == 0x02, "not a PMT"
    position = 12 + (((pmt[10] & 0x0F) << 8) | pmt[11])
    found = {}
    while position < len(pmt) - 4:  # up to the CRC
        kind, es_pid = pmt[position], ((pmt[position + 1] & 0x1F) << 8) | pmt[position + 2]
        found[es_pid] = kind
        position += 5 + (((pmt[position + 3] & 0x0F) << 8) | pmt[position + 4])
    return found


def nal_types(payload: bytes) -> list[int]:
    """The NAL unit types of an Annex B H.264 access unit, in order."""
    starts = [i for i in range(len(payload) - 3) if payload[i : i + 3] == b"\0\0\1"]
    return [payload[i + 3] & 0x1F for i in starts]


def whole(data: bytes | bytearray) -> bytes:
    data = bytes(data)
    return data[: len(data) - len(data) % PACKET_SIZE]


def test_the_file_is_a_picture_a_tone_and_data(media, coding, decoder_log) -> None:
    source = load(media)
    assert source.bitrate == demo_media.MUX_RATE
    assert len(source.data_positions) > 100
    # PAT first, then the PMT, before any audio or video.
    pids = [pid(source.data[i : i + PACKET_SIZE]) for i in range(0, 4 * PACKET_SIZE, PACKET_SIZE)]
    assert PAT_PID in pids[:2] and pids.index(PAT_PID) < 3
    codecs, audio_frame, (video_type, audio_type) = EXPECTED[coding.name]
    decoded = decode(source.data)
    assert decoded["codecs"] == codecs
    assert decoded["data_pid"] == synthetic.DATA_PID
    assert decoded["data_codec"] == "klv"
    assert decoded["keyframe_first"]
    assert decoded["video"] == SECONDS * demo_media.FPS
    assert decoded["audio"] >= SECONDS * demo_media.SAMPLE_RATE // audio_frame - 2
    assert errors(decoder_log) == []
    assert sorted(stream_types(source.data).values()) == sorted(
        [video_type, audio_type, PRIVATE_DATA]
    )
    assert stream_types(source.data)[synthetic.DATA_PID] == PRIVATE_DATA


def test_it_starts_and_runs_as_a_broadcast(media, coding) -> None:
    """
    The file's first keyframe follows its PAT and PMT at once, so that a
    player given the file from its start (or from that keyframe, with the
    PAT and PMT in front) misses nothing.  In H.264 its video runs at a
    constant rate near the configured one, as broadcasters send it, rather
    than a packet now and then among the data packets.
    """
    data = load(media).data
    scanner = KeyframeScanner()
    first_keyframe = scanner.feed(data)[0] // PACKET_SIZE
    packets = [data[i : i + PACKET_SIZE] for i in range(0, len(data), PACKET_SIZE)]
    assert [pid(p) for p in packets[first_keyframe - 2 : first_keyframe]] == [
        PAT_PID,
        scanner.pmt_pid,
    ]
    if coding.name == "h264":
        video_bits = sum(1 for p in packets if pid(p) == scanner.video_pid) * PACKET_SIZE * 8
        assert video_bits / SECONDS >= 0.8 * demo_media.VIDEO_BITRATE


def test_a_keyframe_every_second(media, coding) -> None:
    """
    The video has a keyframe every L{demo_media.GOP} frames and no other,
    so that a player joining anywhere waits at most a second; in H.264 each
    is an IDR picture with the SPS and PPS in front of it, so that a player
    (or an HLS segment) starting there needs nothing from before it.
    """
    with av.open(str(media), format="mpegts") as container:
        video = container.streams.video[0]
        packets = [
            (packet.pts, packet.is_keyframe, bytes(packet))
            for packet in container.demux(video)
            if packet.size
        ]
    assert len(packets) == SECONDS * demo_media.FPS
    frame = 90_000 // demo_media.FPS  # the 90 kHz clock of MPEG-TS timestamps
    start = packets[0][0]
    keyframes = [(pts - start) // frame for pts, keyframe, _ in packets if keyframe]
    assert keyframes == list(range(0, SECONDS * demo_media.FPS, demo_media.GOP))
    if coding.name == "h264":
        idr, sps, pps, non_idr = 5, 7, 8, 1
        for _, keyframe, payload in packets:
            types = nal_types(payload)
            if keyframe:
                assert types.index(sps) < types.index(pps) < types.index(idr), types
                assert non_idr not in types, types
            else:
                assert idr not in types and sps not in types, types


def test_the_muxer_keeps_its_timing(tmp_path, coding, decoder_log) -> None:
    """
    Muxing the file logs nothing: each frame is in the stream before its
    decoding time on the stream's own clock (the muxer warns "dts < pcr"
    otherwise), as a player's buffer model expects.
    """
    demo_media.generate(tmp_path / coding.file_name, seconds=2, coding=coding)
    assert errors(decoder_log) == []


def test_the_loop_is_a_clean_splice(media, decoder_log) -> None:
    """
    The file played twice in a row, as the simulated engine loops it,
    decodes with no packet taken for damaged: the continuity counters
    that jump where it starts again are marked as a discontinuity.  Only
    the time stamps going back are noted (that is the splice).
    """
    data = load(media).data
    decoded = decode(data + data)
    assert decoded["video"] == 2 * SECONDS * demo_media.FPS
    noted = [entry[2] for entry in errors(decoder_log)]
    assert all(" out of order" in message for message in noted), noted


@pytest.fixture
def fake_generate(monkeypatch) -> list:
    """
    Stand in for the encoder: each file it is asked for is written as two
    bytes, and listed here with its coding.
    """
    made = []

    def generate(path: Path, coding: demo_media.Coding) -> None:
        made.append((path, coding))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"ts")

    monkeypatch.setattr(demo_media, "generate", generate)
    return made


def test_made_once_and_cached(tmp_path, monkeypatch, fake_generate) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_media.cache_dir() == tmp_path / "xdg" / "aceproxy"
    made = fake_generate
    path = demo_media.demo_file()
    assert path == tmp_path / "xdg" / "aceproxy" / demo_media.FILE_NAME
    assert demo_media.demo_file() == path
    assert made == [(path, demo_media.DEFAULT)]
    # Each coding is cached apart: asking for the other makes its own file.
    other = demo_media.demo_file(coding=demo_media.MPEG2)
    assert other == tmp_path / "xdg" / "aceproxy" / demo_media.MPEG2.file_name != path
    assert demo_media.demo_file(coding=demo_media.MPEG2) == other
    assert made == [(path, demo_media.DEFAULT), (other, demo_media.MPEG2)]
    assert demo_media.demo_file(tmp_path / "elsewhere.ts") == tmp_path / "elsewhere.ts"
    assert made[2:] == [(tmp_path / "elsewhere.ts", demo_media.DEFAULT)]
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_media.cache_dir() == tmp_path / "home" / ".cache" / "aceproxy"


def test_demo_plays_the_media_it_is_given(media, tmp_path) -> None:
    assert demo.load_media(media).data == load(media).data
    (tmp_path / "text.ts").write_text("not a transport stream\n")
    with pytest.raises(SystemExit, match="^demo: .*not an MPEG-TS file"):
        demo.load_media(tmp_path / "text.ts")


@pytest_twisted.ensureDeferred
async def test_players_through_the_proxy_decode_and_verify(
    media, coding, proxy_factory, decoder_log
) -> None:
    """
    The first player gets the broadcast from the file's start (PAT, PMT, a
    keyframe: its first random-access point) and decodes it with no error; a late joiner starts on a
    keyframe with the PAT and PMT in front, and decodes with no error from
    its first frame too; both players' data PIDs verify gap-free.
    """
    source = load(media)
    running = start_engine(bitrate=source.bitrate, batch_interval=0.02, source=source)
    try:
        proxy = await proxy_factory([running.config("engine-a")])
        first = await Player.open(proxy.stream_url(KEY))
        await first.wait_bytes(2 * len(source.data) // SECONDS)  # two seconds of it
        late = await Player.open(proxy.stream_url(KEY))
        await first.wait_bytes(len(source.data) * 3 // 2)  # past the loop
        await late.wait_bytes(len(source.data) // 2)
        body = whole(first.data)
        assert body[: len(source.data)] != source.data  # data packets are stamped
        report = synthetic.verify(body, content_tag=content_tag(KEY))
        assert report.ok and report.first_seq == 0, report.describe()
        decoded = decode(body[: len(source.data)])
        assert decoded["codecs"] == EXPECTED[coding.name][0]
        assert decoded["keyframe_first"]
        assert decoded["video"] == SECONDS * demo_media.FPS
        assert decoded["audio"] > 0
        assert errors(decoder_log) == []
        late_report = synthetic.verify(whole(late.data), content_tag=content_tag(KEY))
        assert late_report.ok and late_report.first_seq > 0, late_report.describe()
        # Up to a second before the file's loop point (its data packets are
        # numbered on across loops, so the first loop holds per_loop of
        # them): the decoder is judged on the broadcast, not on the loop.
        per_loop = synthetic.verify(body[: len(source.data)], content_tag=content_tag(KEY))
        left = per_loop.data_packets - late_report.first_seq
        before_loop = left * len(source.data) // per_loop.data_packets
        late_body = whole(late.data[: before_loop - len(source.data) // SECONDS])
        # ... and ending on a keyframe, so that its last frame is whole.
        late_body = late_body[: KeyframeScanner().feed(late_body)[-1]]
        assert len(late_body) >= len(source.data) // SECONDS // 2, "the late joiner came too late"
        late_decoded = decode(late_body)
        assert late_decoded["keyframe_first"]
        assert late_decoded["video"] >= demo_media.FPS // 2
        assert late_decoded["audio"] > 0
        assert errors(decoder_log) == []
        first.disconnect()
        late.disconnect()
    finally:
        await running.stop()


def test_made_from_the_command_line(tmp_path, monkeypatch, capsys, fake_generate) -> None:
    """
    C{python -m acestream_proxy.testing.demo_media} makes the coding asked
    for (for C{--media} or C{--source}), where asked, and prints where;
    its default is the demo's own file.
    """
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    made = fake_generate
    wanted = tmp_path / "mpeg2.ts"
    assert demo_media.main(["--coding", "mpeg2", str(wanted)]) == wanted
    assert demo_media.main([str(wanted)]) == wanted  # kept, whatever its coding
    assert made == [(wanted, demo_media.MPEG2)]
    default = demo_media.main([])
    assert default == demo_media.cache_dir() / demo_media.FILE_NAME
    assert made[1:] == [(default, demo_media.H264)]
    assert capsys.readouterr().out.splitlines() == [str(wanted), str(wanted), str(default)]
    with pytest.raises(SystemExit):
        demo_media.main(["--coding", "vp9"])


def begun_mid_gop(source: TsSource) -> tuple[TsSource, int]:
    """
    C{source} turned so that its loop begins half a group of pictures into
    the file, as a live broadcast is tuned into anywhere: the frames before
    the next keyframe need one that is not sent.  The packets are the same,
    so the loop point (back to the file's first packet, a keyframe's) is
    the only splice, and far from where the test looks.

    @return: The turned source, and where in it its first keyframe is.
    """
    found = KeyframeScanner().feed(source.data)
    cut = (found[0] + found[1]) // 2 // PACKET_SIZE * PACKET_SIZE
    data = source.data[cut:] + source.data[:cut]
    return TsSource(data, source.bitrate, data_positions(data)), found[1] - cut


@pytest_twisted.ensureDeferred
async def test_the_first_player_of_a_broadcast_tuned_mid_gop_decodes(
    media, proxy_factory, decoder_log
) -> None:
    """
    The engine's first bytes are frames that need a keyframe it did not
    send (a player given them reports errors); the first player's body
    starts on the first keyframe instead, the PAT and PMT in front, and
    decodes from its first frame with no error.  Its data packets run on
    gap-free from there.
    """
    source, keyframe = begun_mid_gop(load(media))
    second = len(source.data) // SECONDS
    decode(source.data[: keyframe + second])
    assert errors(decoder_log), "the engine's first bytes should not decode cleanly"
    del decoder_log[:]

    running = start_engine(bitrate=source.bitrate, batch_interval=0.02, source=source)
    try:
        proxy = await proxy_factory([running.config("engine-a")])
        first = await Player.open(proxy.stream_url(KEY))
        await first.wait_bytes(2 * second)
        body = whole(first.data)
        first.disconnect()
    finally:
        await running.stop()
    scanner = KeyframeScanner()
    points = scanner.feed(body)
    assert [pid(body), pid(body[PACKET_SIZE:])] == [PAT_PID, scanner.pmt_pid]
    assert points[0] == 2 * PACKET_SIZE
    assert body[points[0] :][:PACKET_SIZE] == source.data[keyframe:][:PACKET_SIZE]
    report = synthetic.verify(body, content_tag=content_tag(KEY))
    assert report.ok and report.first_seq > 0, report.describe()
    # Up to its last keyframe, so that its last frame is whole.
    decoded = decode(body[: points[-1]])
    assert decoded["keyframe_first"]
    assert decoded["video"] >= demo_media.FPS
    assert decoded["audio"] > 0
    assert errors(decoder_log) == []
