"""
Where stream state lives: each stream's metadata, its players and its ring
buffer.  The embedded store (L{acestream_proxy.store.memory}) is the default
and needs nothing installed; the Redis store (L{acestream_proxy.store.redis})
offers the same L{Store} interface so that several workers can share streams.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from ..errors import Unavailable

Fields = Mapping[str, Any]

#: Retry-After (seconds) for a player refused because the store cannot
#: serve: its connections come back within a couple of seconds of Redis.
RETRY_AFTER = 5


class Store(Protocol):
    """
    Stream state shared by every worker that serves the stream.  Every method
    returns a L{Deferred}; metadata and client fields are flat mappings of
    field name to C{str}, C{int} or C{float}.
    """

    buffer: RingBuffer
    segments: SegmentIndex
    #: This worker's id, as the store records it (owner leases, players).
    worker_id: str
    #: C{"memory"} or C{"redis"}, for health reports.
    kind: str
    #: Whether other workers share it: then a stream's players may be on
    #: any of them, and its ring buffer, bounded by C{buffer_chunks} and
    #: C{chunk_ttl} alone, keeps more than a worker's window.
    shared: bool

    def put_stream(self, key: str, fields: Fields) -> Deferred[None]:
        """
        Merge C{fields} into the metadata of stream C{key}, creating it.
        """

    def get_stream(self, key: str) -> Deferred[dict | None]:
        """
        Fire with the metadata of stream C{key}, or L{None}.
        """

    def list_streams(self) -> Deferred[list[dict]]:
        """
        Fire with the metadata of every stream; each carries its C{key}.
        """

    def delete_stream(self, key: str) -> Deferred[None]:
        """
        Forget everything about stream C{key}: metadata, clients, buffer.
        """

    def add_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        """
        Register a client of stream C{key}.
        """

    def update_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        """
        Merge C{fields} into a registered client; a client that is no longer
        registered stays gone.
        """

    def remove_player(self, key: str, client_id: str) -> Deferred[int]:
        """
        Unregister a client; fire with how many clients the stream has left.
        """

    def list_players(self, key: str) -> Deferred[dict[str, dict]]:
        """
        Fire with every client of stream C{key}, by client id.
        """

    def count_players(self, key: str) -> Deferred[int]:
        """
        Fire with how many clients stream C{key} has, every worker's: a
        cheap count, for limits checked on every join.
        """

    def set_last_disconnect(self, key: str, when: float | None) -> Deferred[None]:
        """
        Record when the stream's last client left (L{None}: a client is back).
        """

    def get_last_disconnect(self, key: str) -> Deferred[float | None]:
        """
        Fire with the time recorded by L{set_last_disconnect}.
        """

    def acquire_owner(self, key: str) -> Deferred[bool]:
        """
        Take stream C{key}'s owner lease for this worker if nobody holds it.
        """

    def renew_owner(self, key: str) -> Deferred[bool]:
        """
        Extend this worker's lease (and the life of the stream's keys); fire
        with false if the lease is not this worker's any more.
        """

    def release_owner(self, key: str) -> Deferred[bool]:
        """
        Give up this worker's lease, if it holds it.
        """

    def take_owner_from(self, key: str, worker_id: str) -> Deferred[bool]:
        """
        Take the lease of worker C{worker_id} if it still holds it and is
        known dead (see L{is_alive}).
        """

    def mark_alive(self, ttl: float) -> Deferred[None]:
        """
        Say this worker runs, for C{ttl} seconds: others see it in
        L{is_alive} until then.
        """

    def mark_gone(self) -> Deferred[None]:
        """
        Say this worker stopped.
        """

    def is_alive(self, worker_id: str) -> Deferred[bool]:
        """
        Fire with whether worker C{worker_id} said it runs, recently enough.
        """

    def get_owner(self, key: str) -> Deferred[str | None]:
        """
        Fire with the id of the worker holding the lease, or L{None}.
        """

    def publish(self, key: str, event: str, **fields) -> Deferred[None]:
        """
        Tell every worker's listeners of stream C{key} about C{event}.
        """

    def listen(self, key: str, callback) -> None:
        """
        Call C{callback(event: dict)} for each event of stream C{key}.
        """

    def unlisten(self, key: str, callback) -> None:
        """
        Undo L{listen}.
        """

    #: Whether the store can serve now.
    available: bool

    def when_available(self, within: float) -> Deferred[bool]:
        """
        Fire with whether the store can serve: at once if it can, or if it
        surely cannot soon (nothing is under way to bring it back); else as
        soon as it can, or with false after C{within} seconds.
        """

    def forget_stream_when_back(self, key: str, session_id: str | None) -> None:
        """
        Stream C{key} (its engine session C{session_id}) ended while the
        store could not serve: delete its keys once it can, unless the
        stream is someone else's by then.
        """


@attrs.define
class Listeners:
    """
    The callbacks listening to each stream's events, in one worker.
    """

    _by_key: dict[str, set] = attrs.field(factory=dict)

    def add(self, key: str, callback) -> None:
        self._by_key.setdefault(key, set()).add(callback)

    def discard(self, key: str, callback) -> None:
        callbacks = self._by_key.get(key)
        if callbacks is not None:
            callbacks.discard(callback)
            if not callbacks:
                del self._by_key[key]

    def wanted(self, key: str) -> bool:
        return key in self._by_key

    def dispatch(self, key: str, event: dict) -> None:
        for callback in list(self._by_key.get(key, ())):
            callback(dict(event))


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


class SegmentIndex(Protocol):
    """
    The descriptions of a stream's newest HLS segments, as its owner cut
    them (see L{acestream_proxy.hls.segment}): kept for any worker to read.
    """

    def add(self, key: str, record: str, kept: int) -> Deferred[None]:
        """
        Add the newest segment's C{record}, keeping the newest C{kept}.
        """

    def list(self, key: str) -> Deferred[list[str]]:
        """
        Fire with the stream's records, oldest first.
        """


def _plain(fields: Fields) -> dict:
    """
    Field names as plain text (they are often L{StrEnum} members), as a
    Redis hash would hold them.  Interned: C{str()} of a member makes a new
    string each time, and the embedded store keeps a record of these names
    for every player.
    """
    return {sys.intern(str(name)): value for name, value in fields.items()}
