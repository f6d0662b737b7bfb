"""
Joins and skips on random-access points, through real sockets of 127.0.0.1:
a real MPEG-TS video (made with PyAV) goes through the L{StoreWriter} into a
L{FanOut}, and players served by twisted.web read it.  A late joiner's body
decodes from its first frame without an error; one that skips to live lands
on a random-access point with the PAT and PMT in front.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from acestream_proxy.store.memory import MemoryStore
from acestream_proxy.stream.fanout import FanOut
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.window import ChunkWindow
from acestream_proxy.stream.writer import StoreWriter

from .support import eventually
from .test_keyframes import CHUNK, decode, make_ts, scan
from .test_sendpath import Served, serving

JOIN_CHUNKS = 3


@pytest.fixture(scope="module")
def video() -> bytes:
    return make_ts("mpeg2video", seconds=5)


@pytest.fixture
def served():
    yield from serving(FanOut(ChunkWindow(6, ttl=600), join_chunks=JOIN_CHUNKS))


def owned_store(clock: Clock) -> MemoryStore:
    """A store where this worker owns stream C{k}, so its appends succeed."""
    store = MemoryStore(clock, 100, 60, "worker-1")
    owned = []
    store.acquire_owner("k").addCallback(owned.append)
    assert owned == [True]
    return store


def writer_for(served: Served) -> StoreWriter:
    """The owner's writer, whose chunks the store numbers."""
    clock = Clock()
    return StoreWriter(
        "k", owned_store(clock), clock, served.follower, lambda: True, chunk_bytes=CHUNK
    )


def engine(writer: StoreWriter, data: bytes) -> None:
    """The engine's body, in reads of one chunk each; a short last one is
    sealed once its chunk_delay passed."""
    for start in range(0, len(data), CHUNK):
        writer.write(data[start : start + CHUNK])
    writer.clock.advance(writer.chunk_delay)


def test_the_writer_marks_random_access_points(video: bytes) -> None:
    """Each chunk carries the points that fall in it, and PAT+PMT with them."""
    served = Served(FanOut(ChunkWindow(100, ttl=600), join_chunks=JOIN_CHUNKS))
    engine(writer_for(served), video)
    window = served.follower.window
    chunks = window.run(window.first_index, len(window))
    scanner, expected = scan(video)
    found = [
        (chunk.index - 1) * CHUNK + offset for chunk in chunks for offset in chunk.random_access
    ]
    assert found == expected and len(found) == 5
    pids = [((p[1] & 0x1F) << 8) | p[2] for p in (scanner.pat, scanner.pmt)]
    for chunk in chunks:
        psi = chunk.psi
        if not chunk.random_access:
            assert psi == b""
            continue
        assert len(psi) == 2 * PACKET_SIZE and psi[:PACKET_SIZE] in video
        assert [((psi[i + 1] & 0x1F) << 8) | psi[i + 2] for i in (0, PACKET_SIZE)] == pids


@pytest_twisted.ensureDeferred
async def test_a_late_joiner_decodes_from_its_first_frame(served, video: bytes) -> None:
    """
    A player joining mid-stream gets PAT, PMT and the stream from the newest
    random-access point at least join_chunks behind live; every frame it is
    sent decodes.
    """
    writer = writer_for(served)
    half = len(video) // 2 // CHUNK * CHUNK
    engine(writer, video[:half])
    window = served.follower.window
    chunk, offset = window.random_access_point(JOIN_CHUNKS)
    assert chunk.index <= window.next_index - JOIN_CHUNKS
    start = (chunk.index - 1) * CHUNK + offset
    assert start % CHUNK, "the point should fall inside a chunk, not on its edge"

    client = served.connect()
    await served.player(client)
    engine(writer, video[half:])
    expected = chunk.psi + video[start:]
    await eventually(lambda: len(client.body()) >= len(expected), what="the whole video")
    body = client.body()
    assert body == expected
    errors, frames, packets, first_is_key = decode(body)
    assert (errors, frames, first_is_key) == (0, packets, True)
    assert packets > 25


@pytest_twisted.ensureDeferred
async def test_a_player_that_skips_lands_on_a_random_access_point(served, video: bytes) -> None:
    """
    A player that stopped reading and fell out of the window resumes at the
    newest random-access point, PAT and PMT first, not at a chunk edge.
    """
    served.before_start = lambda request: request.transport.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
    )
    writer = writer_for(served)
    engine(writer, video[: 4 * CHUNK])
    client = served.connect(rcvbuf=4096)
    player = await served.player(client)
    client.transport.pauseProducing()
    engine(writer, video[4 * CHUNK :])
    assert player.paused
    window = served.follower.window
    assert player.position < window.first_index
    chunk, offset = window.random_access_point(1)
    start = (chunk.index - 1) * CHUNK + offset
    assert start % CHUNK
    tail = chunk.psi + video[start:]

    client.transport.resumeProducing()
    await eventually(lambda: player.skips == 1, what="the skip")
    await eventually(lambda: client.body().endswith(tail), what="the stream from the point")
    errors, frames, packets, first_is_key = decode(tail)
    assert (errors, frames, first_is_key) == (0, packets, True)


@pytest_twisted.ensureDeferred
async def test_a_stream_without_video_joins_on_a_chunk_edge(served) -> None:
    """The synthetic stream has no random-access points: today's join."""
    from .fakes import packets

    writer = writer_for(served)
    data = packets(0, 10 * CHUNK // PACKET_SIZE)
    engine(writer, data)
    window = served.follower.window
    assert window.random_access_point(1) is None
    client = served.connect()
    await served.player(client)
    first = window.next_index - JOIN_CHUNKS
    expected = data[(first - 1) * CHUNK :]
    await eventually(lambda: len(client.body()) >= len(expected), what="the window")
    assert client.body() == expected


@pytest_twisted.ensureDeferred
async def test_a_follower_finds_the_points_in_what_it_reads_back(video: bytes) -> None:
    """
    A worker that follows the store's buffer (not the owner) scans what it
    reads, so its chunks carry the same points as the owner's.
    """
    from twisted.logger import Logger

    from acestream_proxy.background import Tasks
    from acestream_proxy.stream.tail import BufferTail

    clock = Clock()
    store = owned_store(clock)
    for start in range(0, len(video), CHUNK):
        await store.buffer.append("k", video[start : start + CHUNK])
    fanout = FanOut(ChunkWindow(100, ttl=600), join_chunks=JOIN_CHUNKS)
    tail = BufferTail(
        "k", store, clock, fanout, Tasks(Logger(), clock, "test"), join_chunks=100,
        first_byte_timeout=5,
    )
    await tail.read_new()
    window = fanout.window
    chunks = window.run(window.first_index, len(window))
    assert chunks[0].index == 1 and sum(chunk.size for chunk in chunks) == len(video)
    found = [
        (chunk.index - 1) * CHUNK + offset for chunk in chunks for offset in chunk.random_access
    ]
    assert found == scan(video)[1]
    assert all(len(chunk.psi) == 2 * PACKET_SIZE for chunk in chunks if chunk.random_access)
