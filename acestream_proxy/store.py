"""
Where stream state lives: each stream's metadata, its clients and its ring
buffer.  L{MemoryStore} is the embedded default and needs nothing installed;
a Redis store offers the same L{Store} interface so that several workers can
share streams.
"""

from collections.abc import Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from .buffer import MemoryRingBuffer, RingBuffer
from .constants import Event, Meta

Fields = Mapping[str, Any]


class Store(Protocol):
    """
    Stream state shared by every worker that serves the stream.  Every method
    returns a L{Deferred}; metadata and client fields are flat mappings of
    field name to C{str}, C{int} or C{float}.
    """

    buffer: RingBuffer
    #: C{"memory"} or C{"redis"}, for health reports.
    kind: str

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

    def add_client(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        """
        Register a client of stream C{key}.
        """

    def update_client(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        """
        Merge C{fields} into a registered client; a client that is no longer
        registered stays gone.
        """

    def remove_client(self, key: str, client_id: str) -> Deferred[int]:
        """
        Unregister a client; fire with how many clients the stream has left.
        """

    def list_clients(self, key: str) -> Deferred[dict[str, dict]]:
        """
        Fire with every client of stream C{key}, by client id.
        """

    def count_clients(self, key: str) -> Deferred[int]:
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

    #: Whether the store can be reached now.
    available: bool


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


@attrs.define
class MemoryStore:
    """
    L{Store} in this process's memory.  Every call fires at once, so a
    sequence of calls made in one reactor turn cannot interleave with another.
    """

    kind = "memory"
    available = True

    clock: IReactorTime
    buffer_chunks: int
    chunk_ttl: float
    worker_id: str = "local"
    buffer: MemoryRingBuffer = attrs.field(init=False)
    _owners: dict[str, str] = attrs.field(factory=dict, init=False)
    _listeners: Listeners = attrs.field(factory=Listeners, init=False)
    _streams: dict[str, dict] = attrs.field(factory=dict, init=False)
    _clients: dict[str, dict[str, dict]] = attrs.field(factory=dict, init=False)
    _last_disconnect: dict[str, float] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.buffer = MemoryRingBuffer(
            self.clock,
            self.buffer_chunks,
            self.chunk_ttl,
            on_append=self._chunk_added,
            may_append=lambda key: self._owners.get(key) == self.worker_id,
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

    def delete_stream(self, key: str) -> Deferred[None]:
        if self._owners.get(key) == self.worker_id:
            del self._owners[key]
        self._streams.pop(key, None)
        self._clients.pop(key, None)
        self._last_disconnect.pop(key, None)
        return self.buffer.delete(key)

    def add_client(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        self._clients.setdefault(key, {})[client_id] = _plain(fields)
        return succeed(None)

    def update_client(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        client = self._clients.get(key, {}).get(client_id)
        if client is not None:
            client.update(_plain(fields))
        return succeed(None)

    def remove_client(self, key: str, client_id: str) -> Deferred[int]:
        clients = self._clients.get(key, {})
        clients.pop(client_id, None)
        return succeed(len(clients))

    def count_clients(self, key: str) -> Deferred[int]:
        return succeed(len(self._clients.get(key, {})))

    def list_clients(self, key: str) -> Deferred[dict[str, dict]]:
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

    def get_owner(self, key: str) -> Deferred[str | None]:
        return succeed(self._owners.get(key))

    def publish(self, key: str, event: str, **fields) -> Deferred[None]:
        message = {"event": event, "worker_id": self.worker_id, "ts": self.clock.seconds(), **fields}
        self._listeners.dispatch(key, message)
        return succeed(None)

    def listen(self, key: str, callback) -> None:
        self._listeners.add(key, callback)

    def unlisten(self, key: str, callback) -> None:
        self._listeners.discard(key, callback)


def _plain(fields: Fields) -> dict:
    """
    Field names as plain text (they are often L{StrEnum} members), as a
    Redis hash would hold them.
    """
    return {str(name): value for name, value in fields.items()}
