"""
A stream's window in one worker: its last chunks of whole TS packets, a few
seconds and megabytes of them, that this worker's players read from.

A L{Chunk} carries its bytes already framed for HTTP/1.1 chunked transfer,
so a chunk is framed once per worker, not once per player.  The store's ring
buffer (L{acestream_proxy.store.base.RingBuffer}) is the window shared by
every worker.
"""

import math
from collections import deque
from itertools import islice

import attrs


def frame(data: bytes) -> tuple[bytes, int]:
    """
    C{data} as one HTTP/1.1 chunk (size line, data, CRLF), and where the
    data starts in it.
    """
    head = b"%x\r\n" % len(data)
    return b"%b%b\r\n" % (head, data), len(head)


@attrs.frozen
class Chunk:
    """
    One buffer entry: whole TS packets, numbered by the stream's buffer index.

    Only the framed form is kept; the packets are a view into it, so a
    chunk's bytes are held once however it is used.

    @ivar framed: the packets as one HTTP/1.1 chunk (size line, data, CRLF).
    @ivar start: where the packets start in C{framed}.
    @ivar size: how many bytes of packets it holds; worked out once, since
        every player counts it for every chunk.
    @ivar random_access: the offsets, within the packets, of the video's
        random-access points, where a joining player can start decoding
        (see L{acestream_proxy.stream.keyframes}); empty when unknown.
    @ivar psi: the stream's PAT and PMT packets current at those points,
        which such a player needs in front of its first packet.
    @ivar video: whether the stream has video whose random-access points
        are found, as known when the chunk was made: C{None} before its PMT
        was seen.  A new player with no point to start at waits for one
        unless this is C{False} (radio, the synthetic test stream, a chunk
        nobody scanned).
    """

    index: int
    framed: bytes
    start: int
    added_at: float
    random_access: tuple[int, ...] = ()
    psi: bytes = b""
    video: bool | None = False
    size: int = attrs.field(init=False)

    @size.default
    def _size(self) -> int:
        return len(self.framed) - self.start - 2

    @classmethod
    def make(
        cls,
        index: int,
        data: bytes,
        added_at: float,
        random_access: tuple[int, ...] = (),
        psi: bytes = b"",
        video: bool | None = False,
    ) -> "Chunk":
        framed, start = frame(data)
        return cls(index, framed, start, added_at, random_access, psi, video)

    @property
    def data(self) -> memoryview:
        return memoryview(self.framed)[self.start : -2]



@attrs.define(eq=False)
class WindowBudget:
    """
    A cap on the bytes held by all the windows of one worker, so that memory
    stays bounded however many streams it serves.

    Every window reports the bytes it gains and loses here.  Enforcement is
    cheap: the window that is appending trims its own oldest chunks first
    (it is the one that just grew, and a busy stream is usually the largest
    one), and only if that is not enough (it is down to its newest chunk) is
    the largest other window trimmed.  Finding it walks the non-empty
    windows, one per stream, and happens only while over the cap, so each
    chunk costs O(1) in the common case.

    @ivar limit: the most bytes of packets the windows may hold together.
    @ivar total: the bytes of packets they hold now.
    """

    limit: int
    total: int = 0
    _windows: set = attrs.field(factory=set, init=False)

    def gained(self, window: "ChunkWindow", size: int) -> None:
        self.total += size
        self._windows.add(window)

    def lost(self, window: "ChunkWindow", size: int) -> None:
        self.total -= size
        if not window.size:
            self._windows.discard(window)

    def enforce(self, appending: "ChunkWindow") -> None:
        """
        Trim windows until the total is within the limit, never taking a
        window's newest chunk.
        """
        while self.total > self.limit and appending.drop_oldest():
            pass
        while self.total > self.limit:
            largest = max(self._windows, key=lambda w: (len(w) > 1, w.size), default=None)
            if largest is None or not largest.drop_oldest():
                return


@attrs.define(eq=False)
class ChunkWindow:
    """
    Consecutive chunks, bounded by count, bytes, age and the worker's
    L{WindowBudget}.  Lookups by index are O(1) because the indices in the
    window are always consecutive.

    Bytes and seconds bound what a window costs whatever the stream's bit
    rate and batch size, which a count alone cannot; the newest chunk is
    always kept, so that a player can join or skip to the live edge.

    @ivar max_chunks: the most chunks kept.
    @ivar ttl: the longest a chunk is kept after it was added.
    @ivar max_bytes: the most bytes of packets kept.
    @ivar max_seconds: how much older than the newest chunk the oldest may be.
    @ivar budget: shared by every window of the worker, if any.
    @ivar size: the bytes of packets held now.
    """

    max_chunks: int
    ttl: float
    max_bytes: float = math.inf
    max_seconds: float = math.inf
    budget: WindowBudget | None = None
    size: int = attrs.field(default=0, init=False)
    _chunks: deque = attrs.field(factory=deque, init=False)

    @property
    def first_index(self) -> int | None:
        return self._chunks[0].index if self._chunks else None

    @property
    def next_index(self) -> int | None:
        """
        The index the next chunk will have, or L{None} for an empty window.
        """
        return self._chunks[-1].index + 1 if self._chunks else None

    def __len__(self) -> int:
        return len(self._chunks)

    def append(self, chunk: Chunk) -> None:
        """
        Add the newest chunk.  A chunk that does not follow the newest one
        (the source skipped ahead) starts the window afresh, so that indices
        stay consecutive.
        """
        chunks = self._chunks
        if chunks and chunk.index != chunks[-1].index + 1:
            self.clear()
        chunks.append(chunk)
        self.size += chunk.size
        if self.budget is not None:
            self.budget.gained(self, chunk.size)
        self._bound(chunk.added_at)
        self.expire(chunk.added_at)
        if self.budget is not None:
            self.budget.enforce(self)

    def _bound(self, newest: float) -> None:
        """
        Drop the oldest chunks beyond the count, bytes and seconds bounds.
        """
        chunks = self._chunks
        oldest = newest - self.max_seconds
        while (
            len(chunks) > self.max_chunks
            or self.size > self.max_bytes
            or chunks[0].added_at < oldest
        ) and self.drop_oldest():
            pass

    def drop_oldest(self) -> bool:
        """
        Drop the oldest chunk unless it is the newest; whether one was
        dropped.
        """
        chunks = self._chunks
        if len(chunks) < 2:
            return False
        self._dropped(chunks.popleft())
        return True

    def _dropped(self, chunk: Chunk) -> None:
        self.size -= chunk.size
        if self.budget is not None:
            self.budget.lost(self, chunk.size)

    def expire(self, now: float) -> None:
        """
        Drop chunks older than the window's time to live.
        """
        chunks = self._chunks
        oldest = now - self.ttl
        while chunks and chunks[0].added_at < oldest:
            self._dropped(chunks.popleft())

    def get(self, index: int) -> Chunk | None:
        chunks = self._chunks
        if not chunks:
            return None
        offset = index - chunks[0].index
        if 0 <= offset < len(chunks):
            return chunks[offset]
        return None

    def random_access_point(self, behind: int) -> tuple[Chunk, int] | None:
        """
        The newest random-access point in a chunk at least C{behind} chunks
        from the live edge (C{1}: the newest chunk), as the chunk and the
        offset in its packets; L{None} when the window holds none there.
        Walks the window's chunks, so it is for joins and skips only.
        """
        chunks = self._chunks
        for position in range(len(chunks) - max(behind, 1), -1, -1):
            chunk = chunks[position]
            if chunk.random_access and chunk.psi:
                return chunk, chunk.random_access[-1]
        return None

    def run(self, index: int, limit: int) -> list[Chunk]:
        """
        Up to C{limit} consecutive chunks from C{index} on (none when the
        window does not hold it).
        """
        chunks = self._chunks
        if not chunks:
            return []
        offset = index - chunks[0].index
        if not 0 <= offset < len(chunks):
            return []
        return list(islice(chunks, offset, offset + limit))

    def clear(self) -> None:
        chunks = self._chunks
        while chunks:
            self._dropped(chunks.popleft())
