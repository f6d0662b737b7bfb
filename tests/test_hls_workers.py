"""
HLS across workers sharing one real Redis (a C{redis-server} of the test's
own), on real sockets, with the simulated engine playing the demo's media
(MPEG-2 video with a keyframe every second, MP2 audio, the synthetic data
packets).

The worker that starts the stream owns it and cuts its segments; another
worker, with no player of its own, lists and serves the same segments, their
bytes put together from the shared ring buffer: whole, identical, each
starting with the PAT and PMT then a keyframe, each decodable alone.

Every wait is for a condition with a deadline (the playlist polled, as a
player polls it), never a fixed sleep.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from acestream_proxy.hls.viewer import viewer_id
from acestream_proxy.store import keys as redis_keys
from acestream_proxy.stream.keyframes import KeyframeScanner
from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID
from acestream_proxy.stream.stream import Role
from acestream_proxy.testing import demo_media
from acestream_proxy.testing.source import TsSource, load

from .support import HASHES, eventually, start_engine, workers_of
from .test_demo_media import decode, errors

KEY = HASHES[0]

#: Long enough that no test reaches the file's loop (each test has an engine
#: of its own, whose broadcast starts at the file's first packet): segments
#: are then judged on the broadcast, not on the loop's splice.
MEDIA_SECONDS = 30

#: The viewer's user agent: one viewer, whichever worker it asks.
USER_AGENT = "hls-test-player/1.0"
HEADERS = {"User-Agent": [USER_AGENT]}

#: Short timers, as in tests/test_workers.py, and a chunk TTL the test can
#: tell from the keys' time to live.
FAST = dict(
    owner_lease=1.5,
    heartbeat_interval=0.5,
    ghost_client_timeout=4,
    cleanup_grace=1,
    chunk_ttl=30,
)


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> TsSource:
    path = tmp_path_factory.mktemp("media") / demo_media.MPEG2.file_name
    demo_media.generate(Path(path), seconds=MEDIA_SECONDS, coding=demo_media.MPEG2)
    return load(path)


@pytest.fixture
def media_engine(media):
    """The simulated engine, playing the demo's media at its own rate."""
    running = start_engine(bitrate=media.bitrate, batch_interval=0.02, source=media)
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def workers(media_engine, redis_server):
    """
    In-process workers on one Redis and the media engine; each is stopped
    at teardown unless the test stopped it already.
    """
    yield from workers_of(media_engine, redis_server.url, FAST)


# --- the playlist, as a player reads it -------------------------------------------


@attrs.frozen
class Listed:
    sequence: int
    duration: float
    discontinuous: bool
    uri: str


@attrs.frozen
class Playlist:
    """
    A live media playlist: its media sequence, its discontinuity sequence
    (L{None} when the tag is absent), its target duration and segments.
    """

    media_sequence: int
    discontinuity_sequence: int | None
    target: int
    segments: tuple[Listed, ...]
    text: str

    @property
    def sequences(self) -> list[int]:
        return [s.sequence for s in self.segments]

    def find(self, sequence: int) -> Listed | None:
        return next((s for s in self.segments if s.sequence == sequence), None)

    def discontinuity_of(self, sequence: int) -> int:
        """
        The discontinuity sequence number of segment C{sequence}, as RFC
        8216 (6.2.2) defines it: the tag's value plus the
        C{#EXT-X-DISCONTINUITY} tags before the segment.
        """
        number = self.discontinuity_sequence or 0
        for segment in self.segments:
            number += segment.discontinuous
            if segment.sequence == sequence:
                return number
        raise KeyError(sequence)


def parse(text: str) -> Playlist:
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U", text
    media_sequence = discontinuity_sequence = target = None
    segments = []
    duration, discontinuous = None, False
    for line in lines[1:]:
        if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            media_sequence = int(line.partition(":")[2])
        elif line.startswith("#EXT-X-DISCONTINUITY-SEQUENCE:"):
            discontinuity_sequence = int(line.partition(":")[2])
        elif line.startswith("#EXT-X-TARGETDURATION:"):
            target = int(line.partition(":")[2])
        elif line == "#EXT-X-DISCONTINUITY":
            discontinuous = True
        elif line.startswith("#EXTINF:"):
            duration = float(line.partition(":")[2].rstrip(","))
        elif line and not line.startswith("#"):
            assert duration is not None, text
            name = line.rsplit("/", 1)[-1]
            assert line == f"../hls/{KEY}/{name}", line
            segments.append(
                Listed(media_sequence + len(segments), duration, discontinuous, line)
            )
            assert name == f"{segments[-1].sequence}.ts", text
            duration, discontinuous = None, False
    assert media_sequence is not None and target is not None, text
    for segment in segments:
        # RFC 8216 4.3.3.1: no segment longer than the target, rounded.
        assert round(segment.duration) <= target, text
    return Playlist(media_sequence, discontinuity_sequence, target, tuple(segments), text)


async def get(url: str) -> tuple[int, dict, bytes]:
    response = await treq.get(url, headers=HEADERS, persistent=False).addTimeout(15, reactor)
    body = await treq.content(response)
    headers = {
        name.decode().lower(): values[-1].decode()
        for name, values in response.headers.getAllRawHeaders()
    }
    # Twisted's client keeps the length apart from the other headers.
    headers["content-length"] = response.length
    return response.code, headers, body


def manifest_url(proxy) -> str:
    return f"{proxy.url}/ace/manifest.m3u8?id={KEY}"


def segment_url(proxy, sequence: int) -> str:
    return f"{proxy.url}/hls/{KEY}/{sequence}.ts"


async def playlist(proxy) -> Playlist:
    code, headers, body = await get(manifest_url(proxy))
    assert code == 200, body
    assert headers["content-type"] == "application/vnd.apple.mpegurl"
    assert headers["cache-control"] == "no-cache, no-store"
    return parse(body.decode())


async def playlist_until(proxy, predicate, timeout: float = 15.0, what: str = "") -> Playlist:
    """
    Poll C{proxy}'s playlist, as a player does (every few tenths of a
    second here, to be quick), until C{predicate} holds for it.
    """
    deadline = reactor.seconds() + timeout
    while True:
        listed = await playlist(proxy)
        if predicate(listed):
            return listed
        assert reactor.seconds() < deadline, f"timed out waiting for {what}:\n{listed.text}"
        await deferLater(reactor, 0.1, lambda: None)


async def segment(proxy, sequence: int) -> bytes:
    code, headers, body = await get(segment_url(proxy, sequence))
    assert code == 200, (sequence, body[:200])
    assert headers["content-type"] == "video/mp2t"
    assert headers["content-length"] == len(body)
    return body


def pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


def check_segment(data: bytes, decoder_log) -> dict:
    """
    C{data} is a segment a player can start with: whole packets, the PAT
    then the PMT, then at once the video's random-access point; decoded
    alone, its first picture is a key frame and libav reports nothing.
    """
    assert len(data) % PACKET_SIZE == 0 and len(data) > 10 * PACKET_SIZE, len(data)
    assert all(data[i] == 0x47 for i in range(0, len(data), PACKET_SIZE))
    scanner = KeyframeScanner()
    access = scanner.feed(data)
    assert pid(data[:PACKET_SIZE]) == PAT_PID
    assert scanner.pmt_pid is not None
    assert pid(data[PACKET_SIZE : 2 * PACKET_SIZE]) == scanner.pmt_pid
    assert access and access[0] == 2 * PACKET_SIZE, access[:3]
    decoded = decode(data)
    assert decoded["codecs"] == {"video": "mpeg2video", "audio": "mp2"}, decoded
    assert decoded["keyframe_first"] is True, decoded
    assert errors(decoder_log) == []
    return decoded


# --- Redis ---------------------------------------------------------------------------


def stream_keys(client) -> list[str]:
    return client.keys(f"{redis_keys.stream(KEY)}*")


def members(client) -> list[str]:
    return sorted(m.decode() for m in client("SMEMBERS", redis_keys.clients(KEY)))


async def streams_view(proxy) -> dict:
    response = await treq.get(proxy.url + "/streams", persistent=False)
    assert response.code == 200
    return {stream["key"]: stream for stream in await treq.json_content(response)}


# --- the tests -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_owners_segments_are_served_by_another_worker(
    media_engine, redis_server, workers, decoder_log
):
    """
    A viewer asks worker A for the playlist (A starts the stream and owns
    it), then fetches every listed segment from worker B, which has no
    player of its own: B serves each, the same bytes as A's, each starting
    with the PAT and PMT then a keyframe, and decodable alone.  B lists the
    same segments (or a later window of them).  The segment list in Redis
    lives no longer than the chunks; the engine saw one session; the viewer
    is one player on both workers; once the stream is stopped, none of its
    keys is left.
    """
    first = await workers()
    second = await workers()
    client = redis_server.client()

    # The first request starts the stream; the playlist waits for the first
    # segment.  Three of them show the cutting going on.
    listed = await playlist_until(
        first, lambda p: len(p.segments) >= 3, what="three segments on A"
    )
    owner = first.registry.streams[KEY]
    assert owner.role is Role.OWNER
    assert KEY not in second.registry.streams
    assert listed.discontinuity_sequence is None
    assert not any(s.discontinuous for s in listed.segments)
    assert listed.sequences == list(
        range(listed.sequences[0], listed.sequences[0] + len(listed.segments))
    )
    # Cut at keyframes (one a second) once at least the target (2 s) long.
    for listed_segment in listed.segments:
        assert 1.9 <= listed_segment.duration <= 3.1, listed.text
    assert listed.target == 2 or listed.target == 3, listed.text

    served = {}
    for listed_segment in listed.segments:
        served[listed_segment.sequence] = await segment(second, listed_segment.sequence)
    follower = second.registry.streams[KEY]
    assert follower.role is Role.FOLLOWER
    for sequence, data in served.items():
        assert await segment(first, sequence) == data, f"segment {sequence} differs"
        decoded = check_segment(data, decoder_log)
        duration = listed.find(sequence).duration
        # Its pictures are its duration's (25 a second), give or take the
        # B-frames reordered across its edges.
        assert abs(decoded["video"] - duration * demo_media.FPS) <= 3, (sequence, decoded)

    # B lists what A cut: the same segments, or a later window of them.
    on_second = await playlist(second)
    assert on_second.sequences[0] >= listed.sequences[0], on_second.text
    assert on_second.sequences == list(
        range(on_second.sequences[0], on_second.sequences[0] + len(on_second.segments))
    )
    for listed_segment in on_second.segments:
        if listed_segment.sequence in served:
            assert listed_segment == listed.find(listed_segment.sequence)
    if on_second.sequences[-1] not in served:
        newest = await segment(second, on_second.sequences[-1])
        assert await segment(first, on_second.sequences[-1]) == newest
        check_segment(newest, decoder_log)

    # The segment list in Redis: the newest 2 x hls_list_size records, kept
    # no longer than the chunks they describe.
    hls_key = redis_keys.hls_segments(KEY)
    assert hls_key == f"ace_proxy:stream:{KEY}:hls:segments"
    assert client("EXISTS", hls_key) == 1
    ttl = client("PTTL", hls_key)
    assert 0 < ttl <= FAST["chunk_ttl"] * 1000, ttl
    assert 1 <= client("LLEN", hls_key) <= 2 * owner.tuning.hls_list_size

    # One engine session for both workers.
    engine = media_engine.engine
    assert engine.getstream_calls == [("id", KEY)]
    assert len(engine.sessions) == 1
    assert engine.playback_connections == 1

    # One viewer: the same id on both workers, registered once.
    viewer = viewer_id(KEY, "127.0.0.1", USER_AGENT)
    assert set(owner.players.viewers) == {viewer}
    assert set(follower.players.viewers) == {viewer}
    assert members(client) == [viewer]
    for proxy in (first, second):
        assert (await streams_view(proxy))[KEY]["players"] == 1

    # Stopped through the API (an admin, from loopback): every key of the
    # stream is deleted, the segment list with them, and the engine session
    # is stopped.
    response = await treq.delete(f"{first.url}/streams/{KEY}", persistent=False)
    assert response.code == 200, await treq.content(response)
    assert await treq.json_content(response) == {"stopped": KEY}
    await eventually(
        lambda: KEY not in first.registry.streams and KEY not in second.registry.streams,
        what="the stream stopped on both workers",
    )
    await eventually(lambda: not stream_keys(client), what=f"no key left: {stream_keys(client)}")
    assert client("EXISTS", hls_key) == 0
    await eventually(lambda: not engine.sessions, what="the engine session stopped")
    assert engine.playback_connections == 0
