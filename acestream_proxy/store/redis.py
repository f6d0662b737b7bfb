"""
The Redis store: the same L{Store} as the embedded one, kept in Redis under
the seed's key schema (L{acestream_proxy.store.keys}), so that several
workers on one host or many share streams.

Chunk data travels on connections that never decode (C{charset=None}): a
chunk of plain ASCII bytes comes back as bytes.  Every multi-key change is one
Lua script, so it costs one round trip and cannot be seen half done.  Every
key of a stream expires unless its owner keeps renewing it, so a stream whose
workers all died leaves nothing behind.

Connections are made through endpoints of the reactor the store is given, and
operations and replies time out on its clock, as everywhere else in the proxy;
only what txredisapi keeps to itself (the back-off between reconnection
attempts, and a turn of the reactor before a new connection joins its pool)
still runs on the global reactor.
"""

import json

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.logger import Logger

from ..constants import Event, Meta
from ..errors import Unavailable
from . import keys, scripts
from .base import Fields, Listeners, NotOwner, _plain
from .connection import PoolFactory, RedisAddress, SubscriberFactory, text, unavailable


def _pairs(flat: list) -> dict:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _flatten(fields: Fields) -> list:
    flat = []
    for name, value in _plain(fields).items():
        flat += [name, value if isinstance(value, (bytes, str)) else repr(value)]
    return flat


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

    store: "RedisStore"

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


@attrs.define(eq=False)
class RedisStore(Service):
    """
    L{Store} on Redis, with the owner lease and the event channel that
    several workers need.

    @ivar reactor: makes the connections to Redis and times their
        operations out.
    @ivar stream_ttl_ms: how long a stream's keys live without their owner
        renewing them.
    """

    kind = "redis"
    log = Logger()

    url: str
    reactor: object
    worker_id: str
    buffer_chunks: int
    chunk_ttl: float
    ghost_client_timeout: float
    owner_lease: float
    worker_timeout: float = 3.0
    op_timeout: float = 5.0
    buffer: RedisRingBuffer = attrs.field(init=False)
    address: RedisAddress = attrs.field(init=False)
    _pool: PoolFactory | None = attrs.field(default=None, init=False)
    _data: PoolFactory | None = attrs.field(default=None, init=False)
    _subscriber: SubscriberFactory | None = attrs.field(default=None, init=False)
    _listeners: Listeners = attrs.field(factory=Listeners, init=False)

    def __attrs_post_init__(self) -> None:
        self.buffer = RedisRingBuffer(self)
        self.address = RedisAddress.parse(self.url)

    @property
    def stream_ttl_ms(self) -> int:
        return int(2000 * max(self.chunk_ttl, self.ghost_client_timeout, self.owner_lease))

    # Connections

    def startService(self) -> None:
        super().startService()
        # Chunks and the owner lease get a connection of their own: a burst
        # of client bookkeeping (hundreds of players joining or leaving) must
        # not delay the owner's appends, or the engine's reader would be
        # paused.
        self._pool = self._connect(PoolFactory(self.reactor, self.address, 2, self.op_timeout))
        self._data = self._connect(PoolFactory(self.reactor, self.address, 1, self.op_timeout))
        self._subscriber = self._connect(SubscriberFactory(self))
        self.log.info("using Redis at {where}", where=self.address.describe())

    def _connect(self, factory):
        """
        Start C{factory}'s connections through an endpoint of our reactor
        (txredisapi's own connection functions use the global one); it keeps
        them up, reconnecting, until it is disconnected.
        """
        factory.startConnecting(self.address.endpoint(self.reactor, timeout=self.op_timeout))
        return factory

    def stopService(self):
        super().stopService()
        closing = [
            factory.disconnect()
            for factory in (self._pool, self._data, self._subscriber)
            if factory is not None
        ]
        self._pool = self._data = self._subscriber = None
        return DeferredList(closing, consumeErrors=True)

    @property
    def available(self) -> bool:
        """
        Whether the connections to Redis are up now.
        """
        return all(factory is not None and factory.size > 0 for factory in (self._pool, self._data))

    def _call(self, *command, data: bool = False) -> Deferred:
        """
        Run one command (on the chunk connection with C{data}); fail with
        L{Unavailable} when the store is stopped, or when Redis has not
        answered within C{op_timeout}, rather than wait for as long as Redis
        is unreachable.
        """
        factory = self._data if data else self._pool
        if factory is None:
            return fail(Unavailable("the Redis store is not running"))
        return self._guard(factory.handler.execute_command(*command))

    def _script(self, script: str, names: list, args: list, data: bool = False) -> Deferred:
        factory = self._data if data else self._pool
        if factory is None:
            return fail(Unavailable("the Redis store is not running"))
        return self._guard(factory.handler.eval(script, names, args))

    def _guard(self, d: Deferred) -> Deferred:
        """
        Time C{d} out on our reactor after C{op_timeout}, and turn every
        failure that says Redis cannot serve now into L{Unavailable}, which
        callers expect and ride out, whether Redis is unreachable, slow, or
        refusing writes for a while (a full memory, a demoted master, a
        dataset loading); any other error reply is a bug, and stays itself.
        """
        return d.addTimeout(self.op_timeout, self.reactor).addErrback(unavailable)

    # Events

    def listen(self, key: str, callback) -> None:
        """
        Call C{callback(event: dict)} for each event published on stream
        C{key}'s channel, by any worker.
        """
        self._listeners.add(key, callback)

    def unlisten(self, key: str, callback) -> None:
        self._listeners.discard(key, callback)

    def _message(self, channel: str, message) -> None:
        key = keys.key_of(channel)
        if not self._listeners.wanted(key):
            return
        try:
            event = json.loads(message)
        except ValueError:
            self.log.warn("ignoring a malformed event on {channel}", channel=channel)
            return
        self._listeners.dispatch(key, event)

    def publish(self, key: str, event: str, **fields) -> Deferred:
        message = json.dumps(
            {"event": event, "worker_id": self.worker_id, "ts": self.reactor.seconds(), **fields}
        )
        return self._call("PUBLISH", keys.events(key), message)

    # Ownership

    def acquire_owner(self, key: str) -> Deferred[bool]:
        """
        Take the stream's owner lease if nobody holds it, and say that this
        worker runs.
        """
        d = self._script(
            scripts.ACQUIRE,
            [keys.owner(key), keys.worker(self.worker_id)],
            [self.worker_id, int(self.owner_lease * 1000), int(self.worker_timeout * 1000)],
            data=True,
        )
        return d.addCallback(lambda reply: int(reply) == 1)

    def renew_owner(self, key: str) -> Deferred[bool]:
        """
        Extend our lease, and the life of the stream's keys; false if the
        lease is no longer ours.
        """
        names = [
            keys.owner(key),
            keys.metadata(key),
            keys.buffer_index(key),
            keys.clients(key),
            keys.last_client_disconnect_time(key),
        ]
        # On the chunk connection: appends wait for a renewed lease, so a
        # renewal must not queue behind client bookkeeping.
        d = self._script(
            scripts.RENEW,
            names,
            [self.worker_id, int(self.owner_lease * 1000), self.stream_ttl_ms],
            data=True,
        )
        return d.addCallback(lambda reply: int(reply) == 1)

    def release_owner(self, key: str) -> Deferred[bool]:
        d = self._script(scripts.RELEASE, [keys.owner(key)], [self.worker_id], data=True)
        return d.addCallback(lambda reply: int(reply) == 1)

    def take_owner_from(self, key: str, worker_id: str) -> Deferred[bool]:
        """
        Take the lease of C{worker_id}, if it still holds it and its
        liveness key has expired.
        """
        d = self._script(
            scripts.TAKE_FROM_DEAD,
            [keys.owner(key), keys.worker(worker_id), keys.worker(self.worker_id)],
            [
                worker_id,
                self.worker_id,
                int(self.owner_lease * 1000),
                int(self.worker_timeout * 1000),
            ],
            data=True,
        )
        return d.addCallback(lambda reply: int(reply) == 1)

    # Workers

    def mark_alive(self, ttl: float) -> Deferred[None]:
        """
        Say this worker runs, for C{ttl} seconds.
        """
        d = self._call("SET", keys.worker(self.worker_id), "1", "PX", int(ttl * 1000), data=True)
        return d.addCallback(lambda _: None)

    def mark_gone(self) -> Deferred[None]:
        return self._call("DEL", keys.worker(self.worker_id), data=True).addCallback(lambda _: None)

    def is_alive(self, worker_id: str) -> Deferred[bool]:
        return self._call("EXISTS", keys.worker(worker_id), data=True).addCallback(
            lambda reply: int(reply) == 1
        )

    def get_owner(self, key: str) -> Deferred[str | None]:
        return self._call("GET", keys.owner(key), data=True).addCallback(
            lambda v: text(v) if v is not None else None
        )

    # Streams

    def put_stream(self, key: str, fields: Fields) -> Deferred[None]:
        """
        The metadata always carries the stream's key, as the embedded
        store's does: listings identify streams by it.
        """
        fields = {Meta.KEY.value: key, **_plain(fields)}
        return self._script(
            scripts.PUT_STREAM, [keys.metadata(key)], [self.stream_ttl_ms, *_flatten(fields)]
        ).addCallback(lambda _: None)

    def get_stream(self, key: str) -> Deferred[dict | None]:
        return self._call("HGETALL", keys.metadata(key)).addCallback(
            lambda flat: _pairs(flat) or None
        )

    def list_streams(self) -> Deferred[list[dict]]:
        """
        A L{Deferred}, as every L{Store} method returns, not a coroutine.
        """
        return Deferred.fromCoroutine(self._list_streams())

    async def _list_streams(self) -> list[dict]:
        names, cursor = set(), b"0"
        while True:
            cursor, found = await self._call(
                "SCAN", cursor, "MATCH", keys.METADATA_PATTERN, "COUNT", 200
            )
            names.update(text(n) for n in found)
            if text(cursor) == "0":
                break
        streams = []
        for name in sorted(names):
            meta = await self.get_stream(keys.key_of(name))
            if meta is not None:
                streams.append(meta)
        return streams

    def delete_stream(self, key: str) -> Deferred[None]:
        return self._script(
            scripts.DELETE_STREAM,
            [
                keys.buffer_index(key),
                keys.owner(key),
                keys.metadata(key),
                keys.clients(key),
                keys.last_client_disconnect_time(key),
            ],
            [
                keys.buffer_chunk_prefix(key),
                self.buffer_chunks,
                keys.client_prefix(key),
                self.worker_id,
            ],
        ).addCallback(lambda _: None)

    # Clients

    def add_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        return self._script(
            scripts.ADD_CLIENT,
            [keys.clients(key), keys.client(key, client_id)],
            [
                int(self.ghost_client_timeout * 1000),
                self.stream_ttl_ms,
                client_id,
                *_flatten(fields),
            ],
        ).addCallback(lambda _: None)

    def update_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        return self._script(
            scripts.UPDATE_CLIENT,
            [keys.client(key, client_id)],
            [int(self.ghost_client_timeout * 1000), *_flatten(fields)],
        ).addCallback(lambda _: None)

    def remove_player(self, key: str, client_id: str) -> Deferred[int]:
        return self._script(
            scripts.REMOVE_CLIENT, [keys.clients(key), keys.client(key, client_id)], [client_id]
        ).addCallback(int)

    def list_players(self, key: str) -> Deferred[dict[str, dict]]:
        """
        Every member of the clients set; a member whose hash has expired (its
        worker stopped heartbeating it) comes with no fields, and so with no
        heartbeat: a ghost.
        """

        def parse(flat):
            return {text(flat[i]): _pairs(flat[i + 1]) for i in range(0, len(flat), 2)}

        return self._script(
            scripts.LIST_CLIENTS, [keys.clients(key)], [keys.client_prefix(key)]
        ).addCallback(parse)

    def count_players(self, key: str) -> Deferred[int]:
        return self._call("SCARD", keys.clients(key)).addCallback(int)

    def set_last_disconnect(self, key: str, when: float | None) -> Deferred[None]:
        name = keys.last_client_disconnect_time(key)
        if when is None:
            d = self._call("DEL", name)
        else:
            d = self._call("SET", name, repr(when), "PX", self.stream_ttl_ms)
        return d.addCallback(lambda _: None)

    def get_last_disconnect(self, key: str) -> Deferred[float | None]:
        return self._call("GET", keys.last_client_disconnect_time(key)).addCallback(
            lambda v: float(v) if v is not None else None
        )
