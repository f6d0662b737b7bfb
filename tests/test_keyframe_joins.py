"""
Joins and skips on random-access points, through real sockets of 127.0.0.1:
a real MPEG-TS video (made with PyAV) goes through the L{StoreWriter} into a
L{FanOut}, and players served by twisted.web read it.  A late joiner's body
decodes from its first frame without an error; one that skips to live lands
on a random-access point with the PAT and PMT in front; the first player of
a stream whose engine starts in mid-GOP starts at the first such point.
Where a player waits for that point, the clock is a L{Clock} and the player
writes to a L{StringTransport}, so that what it was sent when is exact.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from acestream_proxy.store.memory import MemoryStore
from acestream_proxy.stream.fanout import FanOut
from acestream_proxy.stream.keyframes import KeyframeScanner
from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID
from acestream_proxy.stream.player import PlayerInfo, PlayerProducer
from acestream_proxy.stream.window import ChunkWindow
from acestream_proxy.stream.writer import StoreWriter
from acestream_proxy.testing import synthetic

from .fakes import FakeRequest
from .support import eventually
from .test_fanout import dechunk
from .test_keyframes import CHUNK, decode, make_ts, pid, scan
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


def writer_for(served: Served | FanOut) -> StoreWriter:
    """The owner's writer, whose chunks the store numbers."""
    fanout = served.follower if isinstance(served, Served) else served
    clock = Clock()
    return StoreWriter("k", owned_store(clock), clock, fanout, lambda: True, chunk_bytes=CHUNK)


@pytest.fixture(scope="module")
def mid_gop(video: bytes) -> bytes:
    """
    The video from the middle of its first group of pictures, as an engine
    may start sending it: frames that need a keyframe it did not send.
    """
    _, found = scan(video)
    half = (found[1] - found[0]) // 2 // PACKET_SIZE * PACKET_SIZE
    return video[found[0] + half :]


def fake_player(fanout: FanOut) -> tuple[PlayerProducer, FakeRequest]:
    """A player of C{fanout} whose body goes to a L{StringTransport}."""
    request = FakeRequest()
    producer = PlayerProducer(
        PlayerInfo("p", "k", "127.0.0.1", "ua", 0.0), fanout, request, lambda player: None
    )
    producer.start()
    return producer, request


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


@pytest.fixture
def roomy():
    """Served players of a window that holds the whole test video."""
    yield from serving(FanOut(ChunkWindow(100, ttl=600), join_chunks=JOIN_CHUNKS))


@pytest_twisted.ensureDeferred
async def test_the_first_player_starts_at_the_first_random_access_point(
    roomy, mid_gop: bytes
) -> None:
    """
    The engine starts in mid-GOP.  The stream's first data still reaches the
    fan-out at once (what proves the session started), but the first
    player's body begins with the PAT and PMT, then the first random-access
    point the engine sent, and decodes without an error from its first
    frame.  A second player, joining before that point arrived, starts on it
    too.
    """
    fanout = roomy.follower
    writer = writer_for(roomy)
    first_data = fanout.next_chunk()  # as the stream's data source does
    client = roomy.connect()
    player = await roomy.player(client)
    writer.write(mid_gop[:CHUNK])
    assert first_data.called and not fanout.window.get(1).random_access
    assert player.bytes_sent == 0
    second_client = roomy.connect()
    second = await roomy.player(second_client)
    engine(writer, mid_gop[CHUNK:])

    window = fanout.window
    with_point = next(c for c in window.run(1, len(window)) if c.random_access)
    start = (with_point.index - 1) * CHUNK + with_point.random_access[0]
    assert start == KeyframeScanner().feed(mid_gop)[0] > CHUNK
    expected = with_point.psi + mid_gop[start:]
    for body in (client.body, second_client.body):
        await eventually(lambda: len(body()) >= len(expected), what="the video")
        assert body() == expected
    assert player.bytes_sent == second.bytes_sent == len(expected)
    psi = with_point.psi
    scanner = KeyframeScanner()
    assert scanner.feed(expected)[0] == len(psi)
    assert [pid(psi), pid(psi[PACKET_SIZE:])] == [PAT_PID, scanner.pmt_pid]
    assert len(psi) == 2 * PACKET_SIZE
    errors, frames, packets, first_is_key = decode(expected)
    assert (errors, frames, first_is_key) == (0, packets, True)
    # Had it started with the engine's first byte, it could not decode all.
    errors, frames, packets, _ = decode(mid_gop)
    assert errors or frames < packets


def test_video_without_random_access_points_starts_within_the_window_span(
    video: bytes,
) -> None:
    """
    A stream whose PMT names a video PID but that sends no random-access
    point: the first player waits while less stream than the window spans
    (its max_seconds) has come, then starts packet-aligned where a joiner
    would, without a byte missing after that.
    """
    scanner, found = scan(video)
    fanout = FanOut(ChunkWindow(100, ttl=600, max_seconds=2), join_chunks=JOIN_CHUNKS)
    writer = writer_for(fanout)
    psi = scanner.psi_for(tuple(found))
    # Frames between two keyframes, with the tables in front.
    pieces = [
        psi + video[found[1] - (6 - n) * 30 * PACKET_SIZE :][: 30 * PACKET_SIZE]
        for n in range(6)
    ]
    player, request = fake_player(fanout)
    for number, piece in enumerate(pieces[:5]):
        writer.write(piece)
        writer.clock.advance(0.5)  # sealed after chunk_delay, then 0.4 s more
        window = fanout.window
        assert window.get(window.next_index - 1).video is True
        assert not window.get(window.next_index - 1).random_access
        if number < 4:
            assert request.transport.value() == b"" and player.bytes_sent == 0
    # The fifth chunk came 2 s after the first: a joiner's start, 3 behind.
    assert fanout.window.next_index == 6
    sent = b"".join(pieces[2:5])
    assert dechunk(request.transport.value()) == sent
    writer.write(pieces[5])
    writer.clock.advance(0.5)
    assert dechunk(request.transport.value()) == sent + pieces[5]
    assert fanout.is_live(player) and player.bytes_sent == len(sent + pieces[5])


def test_a_stream_found_to_have_no_video_starts_with_its_first_byte() -> None:
    """
    A radio-like stream (the synthetic one): its first chunk has a PAT but
    no PMT yet, so the first player waits; the PMT, naming no video, comes
    in the next, and the player gets everything from the stream's first
    byte at once.
    """
    fanout = FanOut(ChunkWindow(100, ttl=600), join_chunks=JOIN_CHUNKS)
    writer = writer_for(fanout)
    player, request = fake_player(fanout)
    tag = b"TAG1"
    first = synthetic.pat_packet(0) + synthetic.data_packets(0, 40, tag, 0.0)
    second = synthetic.pmt_packet(0) + synthetic.data_packets(40, 40, tag, 0.0)
    writer.write(first)
    writer.clock.advance(writer.chunk_delay)
    assert fanout.window.get(1).video is None
    assert request.transport.value() == b""
    writer.write(second)
    writer.clock.advance(writer.chunk_delay)
    assert fanout.window.get(2).video is False
    body = dechunk(request.transport.value())
    assert body == first + second
    report = synthetic.verify(body, content_tag=tag)
    assert report.ok and report.first_seq == 0, report.describe()
    assert fanout.is_live(player)


def test_the_synthetic_stream_starts_at_once() -> None:
    """
    The simulated engine's stream (PAT and PMT in every read, no video):
    the first player gets its first chunk as it arrives, as it always did.
    """
    fanout = FanOut(ChunkWindow(100, ttl=600), join_chunks=JOIN_CHUNKS)
    writer = writer_for(fanout)
    player, request = fake_player(fanout)
    first_data = fanout.next_chunk()  # as the stream's data source does
    reads = [
        synthetic.pat_packet(n)
        + synthetic.pmt_packet(n)
        + synthetic.data_packets(n * 40, 40, b"TAG1", 0.0)
        for n in range(3)
    ]
    writer.write(reads[0])  # the first data is sealed at once
    assert first_data.called
    assert dechunk(request.transport.value()) == reads[0]
    for read in reads[1:]:
        writer.write(read)
        writer.clock.advance(writer.chunk_delay)
    assert dechunk(request.transport.value()) == b"".join(reads)
    assert fanout.is_live(player) and fanout.window.get(1).video is False
