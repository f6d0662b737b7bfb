"""
HLS through the proxy, end to end: a real HLS client (libavformat, through
PyAV) plays the demo broadcast from C{/ace/manifest.m3u8} while a TS player
watches the same stream, on one engine session; every segment starts on a
keyframe with the PAT and PMT in front; and a playlist or segment that cannot
be had gets the same JSON errors as C{/ace/getstream}.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from urllib.parse import urljoin

import av
import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from acestream_proxy.stream.keyframes import KeyframeScanner
from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID
from acestream_proxy.testing import demo_media, synthetic
from acestream_proxy.testing.engine import content_tag
from acestream_proxy.testing.source import load

from .support import HASHES, Player, start_engine
from .test_demo_media import errors

KEY = HASHES[0]
SECONDS = 4
#: How long the HLS client plays.
PLAY_SECONDS = 15
READER = Path(__file__).with_name("hls_reader.py")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / demo_media.MPEG2.file_name
    demo_media.generate(path, seconds=SECONDS, coding=demo_media.MPEG2)
    return path


@pytest.fixture
def demo_engine(media):
    source = load(media)
    running = start_engine(bitrate=source.bitrate, batch_interval=0.02, source=source)
    yield running
    pytest_twisted.blockon(running.stop())


def manifest_url(proxy, key: str = KEY, param: str = "id") -> str:
    return f"{proxy.url}/ace/manifest.m3u8?{param}={key}"


async def play_hls(url: str, seconds: float) -> dict:
    """Play C{url} with the HLS reader, a process of its own."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [str(READER), url, str(seconds)], env=None, reactor=reactor
    )
    assert code == 0, err.decode(errors="replace")
    return json.loads(out)


async def get(url: str, method: str = "GET"):
    response = await treq.request(method, url).addTimeout(30, reactor)
    return response, await treq.content(response)


def segment_urls(playlist_url: str, playlist: bytes) -> list[str]:
    return [
        urljoin(playlist_url, line)
        for line in playlist.decode().splitlines()
        if line and not line.startswith("#")
    ]


def pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


@pytest_twisted.ensureDeferred
async def test_an_hls_client_plays_beside_a_ts_player_on_one_session(
    demo_engine, proxy_factory
) -> None:
    source = demo_engine.engine.source
    proxy = await proxy_factory([demo_engine.config("engine-a")])
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(len(source.data) // SECONDS)
    played = await play_hls(manifest_url(proxy), PLAY_SECONDS)
    assert played["codecs"] == {"video": "mpeg2video", "audio": "mp2"}
    assert played["keyframe_first"] is True
    # About the seconds it played, at the demo's frame rate, less the wait
    # for the segments the live edge had not reached yet.
    assert played["video"] >= (PLAY_SECONDS - 3) * demo_media.FPS
    assert played["audio"] > 0
    assert played["logs"] == []
    # The TS player watched all along, gap-free, and both came from the one
    # engine session the TS player opened.
    await player.wait_bytes(len(player.data) + len(source.data) // SECONDS)
    body = bytes(player.data)
    report = synthetic.verify(
        body[: len(body) - len(body) % PACKET_SIZE], content_tag=content_tag(KEY)
    )
    assert report.ok, report.describe()
    assert demo_engine.engine.getstream_calls == [("id", KEY)]
    assert len(demo_engine.engine.sessions) == 1
    # The HLS client was a player too, while it played, and is in the
    # metrics.
    stream = proxy.registry.streams[KEY]
    assert len(stream.players.viewers) == 1
    assert len(stream.players) == 2
    response, body = await get(f"{proxy.url}/metrics")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("aceproxy_players", ())] == 2
    segments = samples[("aceproxy_hls_requests_total", (("kind", "segment"),))]
    assert segments >= PLAY_SECONDS / 2 - 2
    assert samples[("aceproxy_hls_requests_total", (("kind", "playlist"),))] >= 1
    assert samples[("aceproxy_hls_segments_total", ())] >= segments
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_every_segment_starts_on_a_keyframe_with_psi_in_front(
    demo_engine,
    proxy_factory,
    decoder_log,
) -> None:
    proxy = await proxy_factory([demo_engine.config("engine-a")], hls_target_duration=1)
    url = manifest_url(proxy, param="infohash")
    response, playlist = await get(url)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/vnd.apple.mpegurl"]
    # A few segments' worth of the broadcast, one playlist after another.
    seen = {}
    while len(seen) < 4:
        for segment_url in segment_urls(url, playlist):
            if segment_url not in seen:
                response, seen[segment_url] = await get(segment_url)
                assert response.code == 200
                assert response.headers.getRawHeaders("content-type") == ["video/mp2t"]
        # As a player does, asking again after a while.
        await deferLater(reactor, 0.5)
        response, playlist = await get(url)
    for data in seen.values():
        assert len(data) % PACKET_SIZE == 0
        assert pid(data) == PAT_PID
        scanner = KeyframeScanner()
        points = scanner.feed(data)
        # The PAT and the PMT, then at once the video's random-access point.
        assert points and points[0] == 2 * PACKET_SIZE
        assert pid(data[PACKET_SIZE:]) == scanner.pmt_pid
        with av.open(io.BytesIO(data), format="mpegts") as container:
            frames = list(container.decode(video=0))
        assert frames[0].key_frame
        # One second between keyframes: a target of 1 s cuts at each.
        assert len(frames) == demo_media.FPS
    assert errors(decoder_log) == []
    # The playlist's segments are consecutive and follow on.
    numbers = [int(u.rsplit("/", 1)[1][:-3]) for u in seen]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


@pytest_twisted.ensureDeferred
async def test_playlist_errors_are_those_of_getstream(demo_engine, proxy_factory) -> None:
    proxy = await proxy_factory([demo_engine.config("engine-a")])
    for query in ["", "?id=nothex", f"?id={KEY}&infohash={KEY}", f"?id={KEY}&id={KEY}"]:
        ts, ts_body = await get(f"{proxy.url}/ace/getstream{query}")
        hls, hls_body = await get(f"{proxy.url}/ace/manifest.m3u8{query}")
        assert (hls.code, json.loads(hls_body)) == (ts.code, json.loads(ts_body)) != (200, None)
        assert hls.headers.getRawHeaders("content-type") == ["application/json"]
    demo_engine.engine.faults.add("getstream_error")
    ts, ts_body = await get(proxy.stream_url(HASHES[1]))
    hls, hls_body = await get(manifest_url(proxy, HASHES[2]))
    assert ts.code == hls.code == 502
    assert json.loads(hls_body) == json.loads(
        ts_body.replace(HASHES[1].encode(), HASHES[2].encode())
    )
    assert proxy.registry.streams == {}


@pytest_twisted.ensureDeferred
async def test_segment_errors(demo_engine, proxy_factory) -> None:
    proxy = await proxy_factory([demo_engine.config("engine-a")])
    # No stream: a segment request starts none.
    response, body = await get(f"{proxy.url}/hls/{KEY}/0.ts")
    assert (response.code, json.loads(body)) == (404, {"error": f"no stream {KEY}"})
    assert demo_engine.engine.getstream_calls == []
    response, body = await get(f"{proxy.url}/hls/{KEY[:39]}/0.ts")
    assert response.code == 400
    assert json.loads(body) == {"error": "stream key must be 40 hexadecimal characters"}
    # HEAD of a playlist says what it would be, and starts no stream either.
    response, body = await get(manifest_url(proxy), "HEAD")
    assert response.code == 200 and body == b""
    assert demo_engine.engine.getstream_calls == []
    response, playlist = await get(manifest_url(proxy))
    last = int(segment_urls(manifest_url(proxy), playlist)[-1].rsplit("/", 1)[1][:-3])
    for name, error in [
        ("x.ts", "no segment 'x.ts': segments are named <number>.ts"),
        (f"{last}.mp4", f"no segment '{last}.mp4': segments are named <number>.ts"),
        (f"{last + 1000}.ts", f"stream {KEY} has no segment {last + 1000}"),
    ]:
        response, body = await get(f"{proxy.url}/hls/{KEY}/{name}")
        assert (response.code, json.loads(body)) == (404, {"error": error})
    response, body = await get(f"{proxy.url}/hls/{KEY}/{last}.ts", "HEAD")
    assert response.code == 200 and body == b""
    assert int(response.headers.getRawHeaders("content-length")[0]) > 0
