"""
The ring buffer of the Redis store: each chunk a key with its own time to
live, under the seed's C{…:buffer:chunk:N} keys.
"""

import json

import attrs
from twisted.internet.defer import Deferred

from ..constants import Event
from . import keys, scripts
from .base import NotOwner


def _appended_index(reply) -> int:
    index = int(reply)
    if index < 0:
        raise NotOwner("this worker does not own the stream")
    return index


@attrs.define(eq=False)
class RedisRingBuffer:
    """
    The L{RingBuffer} of the Redis store: each chunk a key with its own time
    to live; appending stores the chunk, advances the index, drops the chunk
    that left the window and publishes C{chunk_added}, all in one script.
    """

    store: object

    def append(self, key: str, data) -> Deferred[int]:
        store = self.store
        return store._script(
            scripts.APPEND,
            [keys.buffer_index(key), keys.events(key), keys.owner(key)],
            [
                bytes(data),
                int(store.chunk_ttl * 1000),
                store.buffer_chunks,
                keys.buffer_chunk_prefix(key),
                Event.CHUNK_ADDED.value,
                store.stream_ttl_ms,
                store.worker_id,
                json.dumps(float(store.reactor.seconds())),
            ],
            data=True,
        ).addCallback(_appended_index)

    def read(self, key: str, start: int, limit: int) -> Deferred[list[tuple[int, bytes]]]:
        """
        Up to C{limit} chunks from C{start} on; chunks that left the window or
        expired are skipped, so a reader that fell behind gets the oldest
        chunks still there rather than nothing.
        """
        store = self.store

        def pairs(flat):
            return [(int(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]

        return store._script(
            scripts.READ,
            [keys.buffer_index(key)],
            [start, limit, store.buffer_chunks, keys.buffer_chunk_prefix(key)],
            data=True,
        ).addCallback(pairs)

    def latest(self, key: str) -> Deferred[int]:
        return self.store._call("GET", keys.buffer_index(key), data=True).addCallback(
            lambda v: int(v or 0)
        )

    def delete(self, key: str) -> Deferred[None]:
        """
        Forget the chunks and the index only: the stream's metadata and
        clients are L{RedisStore.delete_stream}'s to remove.
        """
        store = self.store
        return store._script(
            scripts.DELETE_BUFFER,
            [keys.buffer_index(key)],
            [keys.buffer_chunk_prefix(key), store.buffer_chunks],
        ).addCallback(lambda _: None)
