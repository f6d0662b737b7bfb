"""
The fan-out: one follower per stream handing each chunk to its players, and
each player's producer honouring pause and resume, skipping to live when it
has fallen out of the window.
"""

from acestream_proxy.stream.fanout import FanOut
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.player import PlayerInfo, PlayerProducer
from acestream_proxy.stream.window import Chunk, ChunkWindow
from acestream_proxy.testing.synthetic import verify

from .fakes import FakeRequest, packets

PER_CHUNK = 10


def dechunk(raw: bytes) -> bytes:
    """
    Decode an HTTP/1.1 chunked body, checking its framing on the way.
    """
    body, pos = bytearray(), 0
    while pos < len(raw):
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end], 16)
        body += raw[end + 2 : end + 2 + size]
        assert raw[end + 2 + size : end + 4 + size] == b"\r\n"
        pos = end + 4 + size
    return bytes(body)


def make_follower(max_chunks=10, join_chunks=3):
    return FanOut(ChunkWindow(max_chunks, ttl=60), join_chunks)


def publish(follower, first, count):
    for index in range(first, first + count):
        data = packets(index * PER_CHUNK, PER_CHUNK)
        follower.deliver(Chunk.make(index, data, added_at=0.0))


def player(follower, chunked=True):
    request = FakeRequest(chunked=chunked)
    left = []
    producer = PlayerProducer(
        PlayerInfo("c", "k", "127.0.0.1", "ua", 0.0), follower, request, left.append
    )
    producer.start()
    return producer, request, left


def test_new_player_starts_join_chunks_behind_live():
    follower = make_follower(join_chunks=3)
    publish(follower, 1, 8)
    producer, request, _ = player(follower)
    body = dechunk(request.transport.value())
    report = verify(body)
    assert report.ok, report.describe()
    assert report.first_seq == 6 * PER_CHUNK
    assert producer.position == 9
    publish(follower, 9, 2)
    assert verify(dechunk(request.transport.value())).last_seq == 11 * PER_CHUNK - 1


def test_every_live_player_gets_the_same_bytes_object():
    """
    The hot path frames a chunk once; players get that very object.
    """
    follower = make_follower()
    publish(follower, 1, 1)
    producers = [player(follower)[0] for _ in range(3)]
    writes = []
    for producer in producers:
        follower.go_live(producer, writes.append, framed=True)
    chunk = Chunk.make(2, packets(20, PER_CHUNK), 0.0)
    follower.deliver(chunk)
    assert len(writes) == 3
    assert all(w is chunk.framed for w in writes)


def test_paused_player_resumes_where_it_stopped():
    follower = make_follower(max_chunks=10)
    publish(follower, 1, 3)
    producer, request, _ = player(follower)
    producer.pauseProducing()
    publish(follower, 4, 5)
    assert follower.live_count == 0
    producer.resumeProducing()
    report = verify(dechunk(request.transport.value()))
    assert report.ok, report.describe()
    assert producer.skips == 0
    assert follower.live_count == 1


def test_player_that_falls_out_of_the_window_skips_to_live():
    follower = make_follower(max_chunks=10)
    publish(follower, 1, 3)
    slow, slow_request, _ = player(follower)
    fast, fast_request, _ = player(follower)
    slow.pauseProducing()
    publish(follower, 4, 30)
    assert len(follower.window) == 10, "memory stays bounded by the window"
    slow.resumeProducing()
    assert slow.skips == 1
    slow_report = verify(dechunk(slow_request.transport.value()), allowed_jumps=1)
    assert slow_report.ok, slow_report.describe()
    assert len(slow_report.gaps) == 1
    assert slow_report.last_seq == 34 * PER_CHUNK - 1
    fast_report = verify(dechunk(fast_request.transport.value()))
    assert fast_report.ok and fast.skips == 0


def test_http10_player_gets_raw_packets():
    follower = make_follower()
    publish(follower, 1, 2)
    producer, request, _ = player(follower, chunked=False)
    publish(follower, 3, 1)
    raw = request.transport.value()
    assert len(raw) % PACKET_SIZE == 0
    assert verify(raw).ok


def test_stream_end_finishes_players_and_connection_loss_detaches():
    follower = make_follower()
    publish(follower, 1, 2)
    ended, _, ended_left = player(follower)
    lost, _, lost_left = player(follower)
    lost.stopProducing()
    assert lost_left == [lost] and lost not in follower.producers
    results = []
    ended.done.addCallback(results.append)
    ended.finish()
    assert results == [None] and ended_left == [ended]
    assert follower.producers == set() and follower.live_count == 0
    ended.finish()
    assert ended_left == [ended], "ending twice detaches once"
