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
from .constants import Meta

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

    def set_last_disconnect(self, key: str, when: float | None) -> Deferred[None]:
        """
        Record when the stream's last client left (L{None}: a client is back).
        """

    def get_last_disconnect(self, key: str) -> Deferred[float | None]:
        """
        Fire with the time recorded by L{set_last_disconnect}.
        """


@attrs.define
class MemoryStore:
    """
    L{Store} in this process's memory.  Every call fires at once, so a
    sequence of calls made in one reactor turn cannot interleave with another.
    """

    kind = "memory"

    clock: IReactorTime
    buffer_chunks: int
    chunk_ttl: float
    buffer: MemoryRingBuffer = attrs.field(init=False)
    _streams: dict[str, dict] = attrs.field(factory=dict, init=False)
    _clients: dict[str, dict[str, dict]] = attrs.field(factory=dict, init=False)
    _last_disconnect: dict[str, float] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.buffer = MemoryRingBuffer(self.clock, self.buffer_chunks, self.chunk_ttl)

    def put_stream(self, key: str, fields: Fields) -> Deferred[None]:
        self._streams.setdefault(key, {Meta.KEY.value: key}).update(_plain(fields))
        return succeed(None)

    def get_stream(self, key: str) -> Deferred[dict | None]:
        stream = self._streams.get(key)
        return succeed(dict(stream) if stream is not None else None)

    def list_streams(self) -> Deferred[list[dict]]:
        return succeed([dict(stream) for stream in self._streams.values()])

    def delete_stream(self, key: str) -> Deferred[None]:
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


def _plain(fields: Fields) -> dict:
    """
    Field names as plain text (they are often L{StrEnum} members), as a
    Redis hash would hold them.
    """
    return {str(name): value for name, value in fields.items()}
