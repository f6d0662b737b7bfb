"""
Tests for the demo's broadcast (L{acestream_proxy.testing.demo_media}): a
picture and a tone a player can decode, with the synthetic data packets
beside them, played by the simulated engine through the proxy and decoded
with PyAV (libavformat and libavcodec, as in VLC and mpv).
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


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / demo_media.FILE_NAME
    demo_media.generate(path, seconds=SECONDS)
    return path


@pytest.fixture
def decoder_log():
    """
    Every message libav logs at warning level or worse while decoding: a
    decoder reports damage it concealed here, without raising.
    """
    previous = av.logging.get_level()
    skip_repeated = av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.WARNING)
    # Each message as it comes, not a repeat held back to be summed with
    # the next message, which could fall in another test's capture.
    av.logging.set_skip_repeated(False)
    with av.logging.Capture() as logs:
        yield logs
    av.logging.set_level(previous)
    av.logging.set_skip_repeated(skip_repeated)


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


def whole(data: bytes | bytearray) -> bytes:
    data = bytes(data)
    return data[: len(data) - len(data) % PACKET_SIZE]


def test_the_file_is_a_picture_a_tone_and_data(media, decoder_log) -> None:
    source = load(media)
    assert source.bitrate == demo_media.MUX_RATE
    assert len(source.data_positions) > 100
    # PAT first, then the PMT, before any audio or video.
    pids = [pid(source.data[i : i + PACKET_SIZE]) for i in range(0, 4 * PACKET_SIZE, PACKET_SIZE)]
    assert PAT_PID in pids[:2] and pids.index(PAT_PID) < 3
    decoded = decode(source.data)
    assert decoded["codecs"] == {"video": "mpeg2video", "audio": "mp2"}
    assert decoded["data_pid"] == synthetic.DATA_PID
    assert decoded["data_codec"] == "klv"
    assert decoded["keyframe_first"]
    assert decoded["video"] == SECONDS * demo_media.FPS
    assert decoded["audio"] >= SECONDS * demo_media.SAMPLE_RATE // 1152 - 2
    assert errors(decoder_log) == []


def test_made_once_and_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_media.cache_dir() == tmp_path / "xdg" / "aceproxy"
    made = []

    def generate(path: Path) -> None:
        made.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"ts")

    monkeypatch.setattr(demo_media, "generate", generate)
    path = demo_media.demo_file()
    assert path == tmp_path / "xdg" / "aceproxy" / demo_media.FILE_NAME
    assert demo_media.demo_file() == path
    assert made == [path]
    assert demo_media.demo_file(tmp_path / "elsewhere.ts") == tmp_path / "elsewhere.ts"
    assert made == [path, tmp_path / "elsewhere.ts"]
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
    media, proxy_factory, decoder_log
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
        assert decoded["codecs"] == {"video": "mpeg2video", "audio": "mp2"}
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
