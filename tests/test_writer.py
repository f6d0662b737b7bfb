"""
The owner's store writer gathers what the engine sends into chunks of about
C{chunk_bytes}, each sent when full or when its first bytes have waited
C{chunk_delay}, and drops what it gathers when the stream stops.  On a
L{Clock}, with the embedded store.
"""

from twisted.internet.task import Clock

from acestream_proxy.store.memory import MemoryStore
from acestream_proxy.stream.fanout import FanOut
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.window import ChunkWindow
from acestream_proxy.stream.writer import StoreWriter
from acestream_proxy.testing.synthetic import verify

from .fakes import packets

KEY = "ab" * 20


def writer_on(clock: Clock, chunk_bytes: int, chunk_delay: float = 0.1) -> StoreWriter:
    store = MemoryStore(clock, 100, 60, "worker-1")
    fanout = FanOut(ChunkWindow(100, ttl=60), join_chunks=3)
    return StoreWriter(
        KEY, store, clock, fanout, lambda: True, chunk_bytes=chunk_bytes, chunk_delay=chunk_delay
    )


def delivered(writer: StoreWriter) -> list:
    window = writer.fanout.window
    return window.run(window.first_index, len(window)) if len(window) else []


def body(chunks) -> bytes:
    return b"".join(bytes(chunk.data) for chunk in chunks)


def test_small_runs_wait_to_fill_a_chunk():
    clock = Clock()
    writer = writer_on(clock, chunk_bytes=10 * PACKET_SIZE)
    for n in range(4):
        writer.write(packets(n * 3, 3))
    (chunk,) = delivered(writer)
    assert chunk.size == 12 * PACKET_SIZE, "sent once it held 10 packets or more"
    assert chunk.framed == b"%x\r\n%b\r\n" % (chunk.size, packets(0, 12))
    assert clock.getDelayedCalls() == []


def test_a_chunk_that_does_not_fill_is_sent_after_chunk_delay():
    clock = Clock()
    writer = writer_on(clock, chunk_bytes=100 * PACKET_SIZE, chunk_delay=0.1)
    writer.write(packets(0, 2))
    clock.advance(0.05)
    writer.write(packets(2, 2))
    assert delivered(writer) == []
    clock.advance(0.05)
    (chunk,) = delivered(writer)
    assert chunk.added_at == 0.1 and chunk.size == 4 * PACKET_SIZE
    writer.write(packets(4, 1))
    clock.advance(0.1)
    chunks = delivered(writer)
    assert [chunk.index for chunk in chunks] == [1, 2]
    report = verify(body(chunks))
    assert report.ok and report.last_seq == 4, report.describe()
    assert clock.getDelayedCalls() == []


def test_the_first_data_is_sent_at_once():
    """
    While the stream's data source waits for its first data (a new session,
    a reconnection), what comes is sent without waiting to fill a chunk.
    """
    clock = Clock()
    writer = writer_on(clock, chunk_bytes=100 * PACKET_SIZE)
    first = writer.fanout.next_chunk()
    writer.write(packets(0, 2))
    assert first.called and first.result.size == 2 * PACKET_SIZE
    writer.write(packets(2, 2))
    assert len(delivered(writer)) == 1
    clock.advance(0.1)
    assert len(delivered(writer)) == 2 and clock.getDelayedCalls() == []


def test_without_chunk_bytes_every_run_is_a_chunk():
    clock = Clock()
    writer = writer_on(clock, chunk_bytes=0)
    writer.write(packets(0, 2))
    writer.write(packets(2, 3))
    assert [chunk.size for chunk in delivered(writer)] == [2 * PACKET_SIZE, 3 * PACKET_SIZE]
    assert clock.getDelayedCalls() == []


def test_stopping_drops_what_is_gathering_and_its_timer():
    clock = Clock()
    writer = writer_on(clock, chunk_bytes=100 * PACKET_SIZE)
    writer.write(packets(0, 2))
    assert clock.getDelayedCalls()
    writer.stop()
    assert clock.getDelayedCalls() == []
    writer.write(packets(2, 2))
    clock.advance(1)
    assert delivered(writer) == [] and clock.getDelayedCalls() == []
