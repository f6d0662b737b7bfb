"""
The embedded store: L{Store} in this process's memory, the default, which
needs nothing installed and serves one worker.
"""

import math
from collections import deque
from typing import Callable

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from ..constants import Event, Meta
from .base import Fields, Listeners, NotOwner, _plain


@attrs.define
class _MemoryStream:
    index: int = 0
    chunks: deque = attrs.field(factory=deque)
    #: The bytes of packets in C{chunks}.
    size: int = 0


@attrs.define
class MemoryRingBuffer:
    """
    L{RingBuffer} in this process's memory; every call fires at once.

    @ivar on_append: called with the key and index of each new chunk, so
        that the store can announce C{chunk_added} as the Redis buffer does.
    @ivar may_append: whether this worker may append to a stream (holds its
        owner lease); a refused append fails with L{NotOwner}.
    @ivar max_bytes: the most bytes of packets kept per stream.
    @ivar max_seconds: how much older than the newest chunk the oldest may
        be.  With C{max_bytes} and C{max_chunks} these are the bounds of the
        fan-out window (L{acestream_proxy.stream.window.ChunkWindow}): this
        buffer holds views into the same bytes, so it must not keep them
        alive longer.
    """

    clock: IReactorTime
    max_chunks: int
    ttl: float
    on_append: Callable[[str, int], object] | None = None
    may_append: Callable[[str], bool] | None = None
    max_bytes: float = math.inf
    max_seconds: float = math.inf
    _streams: dict[str, _MemoryStream] = attrs.field(factory=dict, init=False)

    def _expire(self, stream: _MemoryStream) -> None:
        oldest = self.clock.seconds() - self.ttl
        chunks = stream.chunks
        while chunks and chunks[0][1] < oldest:
            stream.size -= len(chunks.popleft()[2])

    def _bound(self, stream: _MemoryStream) -> None:
        """
        Drop the oldest chunks beyond the count, bytes and seconds bounds,
        never the newest, as the fan-out window does.
        """
        chunks = stream.chunks
        oldest = chunks[-1][1] - self.max_seconds
        while len(chunks) > 1 and (
            len(chunks) > self.max_chunks or stream.size > self.max_bytes or chunks[0][1] < oldest
        ):
            stream.size -= len(chunks.popleft()[2])

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
        stream.size += len(data)
        self._bound(stream)
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


@attrs.define
class MemorySegmentIndex:
    """
    The L{SegmentIndex} of the embedded store: the newest records of each
    stream, deleted with the stream.
    """

    _records: dict[str, deque] = attrs.field(factory=dict)

    def add(self, key: str, record: str, kept: int) -> Deferred[None]:
        records = self._records.get(key)
        if records is None or records.maxlen != kept:
            records = self._records[key] = deque(records or (), maxlen=kept)
        records.append(record)
        return succeed(None)

    def list(self, key: str) -> Deferred[list[str]]:
        return succeed(list(self._records.get(key, ())))

    def delete(self, key: str) -> None:
        self._records.pop(key, None)


@attrs.define
class MemoryStore:
    """
    L{Store} in this process's memory.  Every call fires at once, so a
    sequence of calls made in one reactor turn cannot interleave with another.
    """

    kind = "memory"
    shared = False
    available = True

    clock: IReactorTime
    buffer_chunks: int
    chunk_ttl: float
    worker_id: str = "local"
    buffer_bytes: float = math.inf
    buffer_seconds: float = math.inf
    buffer: MemoryRingBuffer = attrs.field(init=False)
    segments: "MemorySegmentIndex" = attrs.field(init=False)
    _owners: dict[str, str] = attrs.field(factory=dict, init=False)
    _listeners: Listeners = attrs.field(factory=Listeners, init=False)
    _streams: dict[str, dict] = attrs.field(factory=dict, init=False)
    _clients: dict[str, dict[str, dict]] = attrs.field(factory=dict, init=False)
    _last_disconnect: dict[str, float] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.segments = MemorySegmentIndex()
        self.buffer = MemoryRingBuffer(
            self.clock,
            self.buffer_chunks,
            self.chunk_ttl,
            on_append=self._chunk_added,
            may_append=lambda key: self._owners.get(key) == self.worker_id,
            max_bytes=self.buffer_bytes,
            max_seconds=self.buffer_seconds,
        )

    def _chunk_added(self, key: str, index: int) -> None:
        """
        Announce a new chunk as the Redis store does, so that listeners see
        the same events whichever store is configured.
        """
        self.publish(key, Event.CHUNK_ADDED.value, index=index)

    def put_stream(self, key: str, fields: Fields) -> Deferred[None]:
        self._streams.setdefault(key, {Meta.KEY.value: key}).update(_plain(fields))
        return succeed(None)

    def get_stream(self, key: str) -> Deferred[dict | None]:
        stream = self._streams.get(key)
        return succeed(dict(stream) if stream is not None else None)

    def list_streams(self) -> Deferred[list[dict]]:
        return succeed([dict(stream) for stream in self._streams.values()])

    def when_available(self, within: float) -> Deferred[bool]:
        return succeed(True)

    def forget_stream_when_back(self, key: str, session_id: str | None) -> None:
        """
        Never called (this store is always available); deletes at once.
        """
        self.delete_stream(key)

    def delete_stream(self, key: str) -> Deferred[None]:
        if self._owners.get(key) == self.worker_id:
            del self._owners[key]
        self._streams.pop(key, None)
        self._clients.pop(key, None)
        self._last_disconnect.pop(key, None)
        self.segments.delete(key)
        return self.buffer.delete(key)

    def add_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        self._clients.setdefault(key, {})[client_id] = _plain(fields)
        return succeed(None)

    def update_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        client = self._clients.get(key, {}).get(client_id)
        if client is not None:
            client.update(_plain(fields))
        return succeed(None)

    def remove_player(self, key: str, client_id: str) -> Deferred[int]:
        clients = self._clients.get(key, {})
        clients.pop(client_id, None)
        return succeed(len(clients))

    def count_players(self, key: str) -> Deferred[int]:
        return succeed(len(self._clients.get(key, {})))

    def list_players(self, key: str) -> Deferred[dict[str, dict]]:
        clients = self._clients.get(key, {})
        return succeed({cid: dict(fields) for cid, fields in clients.items()})

    def set_last_disconnect(self, key: str, when: float | None) -> Deferred[None]:
        if when is None:
            self._last_disconnect.pop(key, None)
        else:
            self._last_disconnect[key] = when
        return succeed(None)

    def get_last_disconnect(self, key: str) -> Deferred[float | None]:
        return succeed(self._last_disconnect.get(key))

    def acquire_owner(self, key: str) -> Deferred[bool]:
        if key in self._owners:
            return succeed(False)
        self._owners[key] = self.worker_id
        return succeed(True)

    def renew_owner(self, key: str) -> Deferred[bool]:
        return succeed(self._owners.get(key) == self.worker_id)

    def release_owner(self, key: str) -> Deferred[bool]:
        if self._owners.get(key) != self.worker_id:
            return succeed(False)
        del self._owners[key]
        return succeed(True)

    def take_owner_from(self, key: str, worker_id: str) -> Deferred[bool]:
        """
        Never: every worker of an embedded store is this process, alive.
        """
        return succeed(False)

    def mark_alive(self, ttl: float) -> Deferred[None]:
        return succeed(None)

    def mark_gone(self) -> Deferred[None]:
        return succeed(None)

    def is_alive(self, worker_id: str) -> Deferred[bool]:
        return succeed(True)

    def get_owner(self, key: str) -> Deferred[str | None]:
        return succeed(self._owners.get(key))

    def publish(self, key: str, event: str, **fields) -> Deferred[None]:
        message = {
            "event": event,
            "worker_id": self.worker_id,
            "ts": self.clock.seconds(),
            **fields,
        }
        self._listeners.dispatch(key, message)
        return succeed(None)

    def listen(self, key: str, callback) -> None:
        self._listeners.add(key, callback)

    def unlisten(self, key: str, callback) -> None:
        self._listeners.discard(key, callback)
