"""
The window's bounds (count, bytes, seconds, age) and the worker's budget over
all windows, checked on made-up chunks with made-up times.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from acestream_proxy.store.memory import MemoryRingBuffer
from acestream_proxy.stream.fanout import FanOut
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.window import Chunk, ChunkWindow, WindowBudget
from acestream_proxy.testing.synthetic import verify

from .fakes import FakeEngineAPI, FakeRequest, make_server, packets
from .test_fanout import dechunk, player

PER_CHUNK = 8
CHUNK_BYTES = PER_CHUNK * PACKET_SIZE


def chunk(index: int, at: float = 0.0, count: int = PER_CHUNK) -> Chunk:
    return Chunk.make(index, packets(index * PER_CHUNK, count), added_at=at)


def fill(window: ChunkWindow, first: int, count: int, step: float = 0.0) -> None:
    for index in range(first, first + count):
        window.append(chunk(index, at=index * step))


def indices(window: ChunkWindow) -> list[int]:
    first = window.first_index
    return [] if first is None else list(range(first, window.next_index))


def check_consistent(window: ChunkWindow) -> None:
    """
    Every index between first and next is there, in order, and the byte
    count matches the chunks.
    """
    found = [window.get(i) for i in indices(window)]
    assert [c.index for c in found] == indices(window)
    assert window.size == sum(c.size for c in found)
    assert window.get(window.first_index - 1) is None
    assert window.get(window.next_index) is None


def test_count_bound():
    window = ChunkWindow(5, ttl=60)
    fill(window, 1, 12)
    assert indices(window) == [8, 9, 10, 11, 12]
    check_consistent(window)


def test_bytes_bound():
    window = ChunkWindow(1000, ttl=60, max_bytes=3 * CHUNK_BYTES + 10)
    fill(window, 1, 10)
    assert indices(window) == [8, 9, 10]
    assert window.size == 3 * CHUNK_BYTES
    check_consistent(window)


def test_seconds_bound_is_relative_to_the_newest_chunk():
    window = ChunkWindow(1000, ttl=600, max_seconds=2.0)
    fill(window, 1, 10, step=0.5)
    # The newest was added at 5.0: chunks from 3.0 on are kept.
    assert indices(window) == [6, 7, 8, 9, 10]
    check_consistent(window)


def test_ttl_still_applies():
    window = ChunkWindow(1000, ttl=1.0)
    fill(window, 1, 10, step=0.5)
    assert indices(window) == [8, 9, 10]
    window.expire(100.0)
    assert len(window) == 0 and window.size == 0


def test_newest_chunk_is_never_dropped():
    window = ChunkWindow(1000, ttl=60, max_bytes=1, max_seconds=1e-9)
    fill(window, 1, 4, step=1.0)
    assert indices(window) == [4]
    assert window.get(4).index == 4
    assert window.size == CHUNK_BYTES
    check_consistent(window)


def test_a_gap_starts_afresh_and_bounds_still_hold():
    window = ChunkWindow(1000, ttl=60, max_bytes=2 * CHUNK_BYTES)
    fill(window, 1, 5)
    fill(window, 20, 3)
    assert indices(window) == [21, 22]
    check_consistent(window)


def test_chunks_of_different_sizes_are_counted_by_their_bytes():
    window = ChunkWindow(1000, ttl=60, max_bytes=10 * PACKET_SIZE)
    window.append(chunk(1, count=6))
    window.append(chunk(2, count=3))
    assert indices(window) == [1, 2]
    window.append(chunk(3, count=2))
    assert indices(window) == [2, 3]
    assert window.size == 5 * PACKET_SIZE
    check_consistent(window)


def test_budget_trims_the_appending_window_first():
    budget = WindowBudget(limit=6 * CHUNK_BYTES)
    a = ChunkWindow(1000, ttl=60, budget=budget)
    b = ChunkWindow(1000, ttl=60, budget=budget)
    fill(a, 1, 3)
    fill(b, 1, 3)
    assert budget.total == 6 * CHUNK_BYTES
    fill(b, 4, 2)
    assert indices(a) == [1, 2, 3]
    assert indices(b) == [3, 4, 5]
    assert budget.total == a.size + b.size == 6 * CHUNK_BYTES
    check_consistent(a)
    check_consistent(b)


def test_budget_trims_the_largest_window_when_the_appending_one_cannot_shrink():
    budget = WindowBudget(limit=6 * CHUNK_BYTES)
    big = ChunkWindow(1000, ttl=60, budget=budget)
    small = ChunkWindow(1000, ttl=60, budget=budget)
    single = ChunkWindow(1000, ttl=60, budget=budget)
    fill(big, 1, 4)
    fill(small, 1, 2)
    # One more chunk in a window of one: it keeps it, the largest pays.
    fill(single, 1, 1)
    assert indices(single) == [1]
    assert indices(big) == [2, 3, 4]
    assert indices(small) == [1, 2]
    assert budget.total == 6 * CHUNK_BYTES


def test_budget_never_exceeded_across_many_windows():
    budget = WindowBudget(limit=10 * CHUNK_BYTES)
    windows = [ChunkWindow(1000, ttl=60, budget=budget) for _ in range(4)]
    for index in range(1, 30):
        for window in windows:
            window.append(chunk(index))
            assert budget.total <= budget.limit
            assert budget.total == sum(w.size for w in windows)
    for window in windows:
        assert window.next_index == 30
        check_consistent(window)


def test_budget_may_be_exceeded_only_by_newest_chunks():
    """
    A limit below one chunk per window is met as far as it can be: each
    window keeps its newest chunk.
    """
    budget = WindowBudget(limit=CHUNK_BYTES)
    windows = [ChunkWindow(1000, ttl=60, budget=budget) for _ in range(3)]
    for window in windows:
        fill(window, 1, 3)
    assert [indices(w) for w in windows] == [[3], [3], [3]]
    assert budget.total == 3 * CHUNK_BYTES


def test_clearing_a_window_gives_its_bytes_back():
    budget = WindowBudget(limit=100 * CHUNK_BYTES)
    a = ChunkWindow(1000, ttl=60, budget=budget)
    b = ChunkWindow(1000, ttl=60, budget=budget)
    fill(a, 1, 5)
    fill(b, 1, 2)
    a.clear()
    assert budget.total == 2 * CHUNK_BYTES
    a.expire(0)
    b.expire(1000.0)
    assert budget.total == 0
    assert len(a) == len(b) == 0


def test_memory_ring_buffer_has_the_same_bounds():
    clock = Clock()
    ring = MemoryRingBuffer(clock, 1000, 600, max_bytes=3 * CHUNK_BYTES, max_seconds=60)
    for index in range(1, 6):
        ring.append("k", chunk(index).data)
    assert [i for i, _ in ring.read("k", 0, 100).result] == [3, 4, 5]

    ring = MemoryRingBuffer(clock, 1000, 600, max_seconds=2.0)
    for index in range(1, 6):
        ring.append("k", chunk(index).data)
        clock.advance(1.0)
    assert [i for i, _ in ring.read("k", 0, 100).result] == [3, 4, 5]

    ring = MemoryRingBuffer(clock, 1000, 600, max_bytes=1, max_seconds=1e-9)
    ring.append("k", chunk(1).data)
    clock.advance(5)
    ring.append("k", chunk(2).data)
    assert [i for i, _ in ring.read("k", 0, 100).result] == [2]


def test_a_window_of_one_chunk_still_lets_a_player_join_and_keep_up():
    follower = FanOut(ChunkWindow(1000, ttl=60, max_bytes=CHUNK_BYTES), join_chunks=3)
    fill(follower.window, 1, 5)
    follower.last_index = 5
    _, request, _ = player(follower)
    for index in range(6, 9):
        follower.deliver(chunk(index))
    report = verify(dechunk(request.transport.value()))
    assert report.ok, report.describe()
    assert report.first_seq == 5 * PER_CHUNK
    assert report.last_seq == 9 * PER_CHUNK - 1


def test_budget_across_two_streams_keeps_players_whole():
    """
    Two streams in one worker under a budget of a few chunks: the windows
    shrink, a player that keeps up misses nothing, and a paused one skips to
    live once, on a packet boundary.
    """
    per_chunk = 50
    clock = Clock()
    api = FakeEngineAPI()
    server = make_server(
        clock, api, max_buffer_bytes=6 * per_chunk * PACKET_SIZE, buffer_bytes=6291456
    )
    server.startService()
    keys = ["ab" * 20, "cd" * 20]
    requests = [FakeRequest(), FakeRequest()]
    for key, request in zip(keys, requests):
        Deferred.fromCoroutine(server.attach(key, "id", request))
    readers = api.readers
    assert len(readers) == 2

    def feed(first: int, count: int) -> None:
        for n in range(first, first + count):
            for reader in readers:
                reader.dataReceived(packets(n * per_chunk, per_chunk))
            clock.advance(0.05)
            assert server.budget.total <= server.budget.limit

    feed(0, 2)
    requests[1].producer.pauseProducing()
    feed(2, 20)
    windows = [server.streams[key].fanout.window for key in keys]
    assert server.budget.total == sum(w.size for w in windows)
    assert all(len(w) >= 1 for w in windows)
    requests[1].producer.resumeProducing()
    feed(22, 3)

    live = verify(dechunk(requests[0].transport.value()))
    assert live.ok, live.describe()
    assert live.last_seq == 25 * per_chunk - 1
    paused = verify(dechunk(requests[1].transport.value()), allowed_jumps=1)
    assert paused.ok, paused.describe()
    assert paused.last_seq == 25 * per_chunk - 1
    assert server.streams[keys[1]].players.producers.pop().skips == 1
    assert server.streams[keys[0]].players.producers.pop().skips == 0
