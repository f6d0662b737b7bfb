"""
The ring buffer of a stream: the last C{buffer_chunks} chunks of whole TS
packets, none older than C{chunk_ttl}.

L{RingBuffer} is what a store offers (in memory here; Redis keeps the same
shape under the seed's key schema).  L{ChunkWindow} is the small local window
that the fan-out reads from: it holds L{Chunk} values that carry their bytes
already framed for HTTP/1.1 chunked transfer, so a chunk is framed once per
worker, not once per player.
"""

from collections import deque
from typing import Callable, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from .errors import Unavailable


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
    """

    index: int
    framed: bytes
    start: int
    added_at: float

    @classmethod
    def make(cls, index: int, data: bytes, added_at: float) -> "Chunk":
        framed, start = frame(data)
        return cls(index, framed, start, added_at)

    @property
    def data(self) -> memoryview:
        return memoryview(self.framed)[self.start : -2]

    @property
    def size(self) -> int:
        return len(self.framed) - self.start - 2


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


class NotOwner(Unavailable):
    """
    The buffer refused a chunk: this worker does not hold the stream's
    owner lease, so another worker's chunks may be landing in its place.
    """


class RingBuffer(Protocol):
    """
    A store's shared ring buffer, one per stream key.
    """

    def append(self, key: str, data: bytes | memoryview) -> Deferred[int]:
        """
        Store C{data} as the stream's next chunk; fire with its index.  Only
        the holder of the stream's owner lease may append; anyone else gets
        L{NotOwner}.
        """

    def read(self, key: str, start: int, limit: int) -> Deferred[list[tuple[int, bytes]]]:
        """
        Fire with up to C{limit} chunks from index C{start} on, oldest first,
        skipping those that have expired.
        """

    def latest(self, key: str) -> Deferred[int]:
        """
        Fire with the index of the newest chunk (0 when there is none).
        """

    def delete(self, key: str) -> Deferred[None]:
        """
        Forget every chunk and the index of a stream.
        """


@attrs.define
class _MemoryStream:
    index: int = 0
    chunks: deque = attrs.field(factory=deque)


@attrs.define
class MemoryRingBuffer:
    """
    L{RingBuffer} in this process's memory; every call fires at once.

    @ivar on_append: called with the key and index of each new chunk, so
        that the store can announce C{chunk_added} as the Redis buffer does.
    @ivar may_append: whether this worker may append to a stream (holds its
        owner lease); a refused append fails with L{NotOwner}.
    """

    clock: IReactorTime
    max_chunks: int
    ttl: float
    on_append: Callable[[str, int], object] | None = None
    may_append: Callable[[str], bool] | None = None
    _streams: dict[str, _MemoryStream] = attrs.field(factory=dict, init=False)

    def _expire(self, stream: _MemoryStream) -> None:
        oldest = self.clock.seconds() - self.ttl
        chunks = stream.chunks
        while chunks and chunks[0][1] < oldest:
            chunks.popleft()

    def append(self, key: str, data: bytes | memoryview) -> Deferred[int]:
        """
        Keep C{data} as given: a view into a framed chunk stays a view, so
        this buffer and the fan-out window share its memory.
        """
        if self.may_append is not None and not self.may_append(key):
            return fail(NotOwner("this worker does not own the stream"))
        stream = self._streams.setdefault(key, _MemoryStream())
        stream.index += 1
        stream.chunks.append((stream.index, self.clock.seconds(), data))
        while len(stream.chunks) > self.max_chunks:
            stream.chunks.popleft()
        self._expire(stream)
        if self.on_append is not None:
            self.on_append(key, stream.index)
        return succeed(stream.index)

    def read(self, key: str, start: int, limit: int) -> Deferred[list[tuple[int, bytes]]]:
        stream = self._streams.get(key)
        if stream is None:
            return succeed([])
        self._expire(stream)
        found = [(index, bytes(data)) for index, _, data in stream.chunks if index >= start]
        return succeed(found[:limit])

    def latest(self, key: str) -> Deferred[int]:
        stream = self._streams.get(key)
        return succeed(stream.index if stream else 0)

    def count(self, key: str) -> int:
        """
        How many chunks the stream holds now (for inspection and tests).
        """
        stream = self._streams.get(key)
        if stream is None:
            return 0
        self._expire(stream)
        return len(stream.chunks)

    def delete(self, key: str) -> Deferred[None]:
        self._streams.pop(key, None)
        return succeed(None)
