"""
A stream's window in one worker: its last chunks of whole TS packets, none
older than C{chunk_ttl}, that this worker's players read from.

A L{Chunk} carries its bytes already framed for HTTP/1.1 chunked transfer,
so a chunk is framed once per worker, not once per player.  The store's ring
buffer (L{acestream_proxy.store.base.RingBuffer}) is the window shared by
every worker.
"""

from collections import deque

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
    """

    index: int
    framed: bytes
    start: int
    added_at: float
    size: int = attrs.field(init=False)

    @size.default
    def _size(self) -> int:
        return len(self.framed) - self.start - 2

    @classmethod
    def make(cls, index: int, data: bytes, added_at: float) -> "Chunk":
        framed, start = frame(data)
        return cls(index, framed, start, added_at)

    @property
    def data(self) -> memoryview:
        return memoryview(self.framed)[self.start : -2]



@attrs.define
class ChunkWindow:
    """
    Consecutive chunks, bounded by count and age.  Lookups by index are O(1)
    because the indices in the window are always consecutive.
    """

    max_chunks: int
    ttl: float
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
            chunks.clear()
        chunks.append(chunk)
        while len(chunks) > self.max_chunks:
            chunks.popleft()
        self.expire(chunk.added_at)

    def expire(self, now: float) -> None:
        """
        Drop chunks older than the window's time to live.
        """
        chunks = self._chunks
        oldest = now - self.ttl
        while chunks and chunks[0].added_at < oldest:
            chunks.popleft()

    def get(self, index: int) -> Chunk | None:
        chunks = self._chunks
        if not chunks:
            return None
        offset = index - chunks[0].index
        if 0 <= offset < len(chunks):
            return chunks[offset]
        return None

    def clear(self) -> None:
        self._chunks.clear()
