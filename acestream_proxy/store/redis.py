"""
The Redis store: the same L{Store} as the embedded one, kept in Redis under
the seed's key schema (L{acestream_proxy.store.keys}), so that several
workers on one host or many share streams.

Chunk data travels on connections that never decode (C{charset=None}): a
chunk of plain ASCII bytes comes back as bytes.  Every multi-key change is one
Lua script, so it costs one round trip and cannot be seen half done.  Every
key of a stream expires unless its owner keeps renewing it, so a stream whose
workers all died leaves nothing behind.

Connections are made through endpoints of the reactor the store is given,
kept up (whatever happened to them) by services on it, and operations and
replies time out on its clock, as everywhere else in the proxy.  Whether the
store can serve now, and the logging of its outages, is its L{Availability}.
"""

import json

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger

from ..constants import Meta
from ..errors import Unavailable
from ..metrics import Metrics
from . import keys, scripts
from .address import RedisAddress
from .availability import Availability
from .base import RETRY_AFTER, Fields, Listeners, _plain
from .connection import (
    PoolFactory,
    SubscriberFactory,
    refusal,
    unavailable,
)
from .redis_buffer import RedisRingBuffer
from .redis_ended import EndedStreams
from .redis_leases import LeaseCommands
from .redis_players import PlayerCommands
from .redis_segments import RedisSegmentIndex
from .replies import flatten, pairs, text


@attrs.define(eq=False)
class RedisStore(LeaseCommands, PlayerCommands, EndedStreams, Service):
    """
    L{Store} on Redis, with the owner lease and the event channel that
    several workers need.

    @ivar url: where Redis is; it may hold a password, so it is left out of
        the repr.
    @ivar reactor: makes the connections to Redis and times their
        operations out.
    @ivar stream_ttl_ms: how long a stream's keys live without their owner
        renewing them.
    @ivar metrics: the worker's metrics, where every failed operation counts.
    """

    kind = "redis"
    shared = True
    log = Logger()

    url: str = attrs.field(repr=False)
    reactor: object
    worker_id: str
    buffer_chunks: int
    chunk_ttl: float
    ghost_client_timeout: float
    owner_lease: float
    worker_timeout: float = 3.0
    op_timeout: float = 5.0
    metrics: Metrics = attrs.field(factory=Metrics)
    buffer: RedisRingBuffer = attrs.field(init=False)
    segments: RedisSegmentIndex = attrs.field(init=False)
    address: RedisAddress = attrs.field(init=False)
    _pool: PoolFactory | None = attrs.field(default=None, init=False)
    _data: PoolFactory | None = attrs.field(default=None, init=False)
    _subscriber: SubscriberFactory | None = attrs.field(default=None, init=False)
    _listeners: Listeners = attrs.field(factory=Listeners, init=False)
    _availability: Availability | None = attrs.field(default=None, init=False)
    #: Streams ended while Redis could not be reached, whose keys are to be
    #: deleted once it is back: key -> (ended session id, when it ended).
    _ended: dict = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.buffer = RedisRingBuffer(self)
        self.segments = RedisSegmentIndex(self)
        self.address = RedisAddress.parse(self.url)

    @property
    def stream_ttl_ms(self) -> int:
        return int(2000 * max(self.chunk_ttl, self.ghost_client_timeout, self.owner_lease))

    # Connections

    def startService(self) -> None:
        # Chunks and the owner lease get a connection of their own: a burst
        # of client bookkeeping (hundreds of players joining or leaving) must
        # not delay the owner's appends, or the engine's reader would be
        # paused.
        endpoint = self.address.endpoint(self.reactor, timeout=self.op_timeout)
        super().startService()
        self._pool = PoolFactory(self.reactor, self.address, 2, self.op_timeout)
        self._data = PoolFactory(self.reactor, self.address, 1, self.op_timeout)
        self._subscriber = SubscriberFactory(self, self.op_timeout)
        self._availability = Availability(
            self.log,
            self.reactor,
            self.address.describe(),
            (self._pool, self._data),
            probe=self._probe,
            back=self._back,
        )
        self.log.info("using Redis at {where}", where=self.address.describe())
        for factory in (self._pool, self._data, self._subscriber):
            factory.on_change = self._availability.changed
            factory.on_failure = self._availability.failed
            # Connections are made through an endpoint of our reactor, and
            # kept up until the factory is disconnected.
            factory.startConnecting(endpoint)

    def stopService(self):
        """
        Close the connections; streams that ended while Redis could not be
        reached leave their keys to expire.
        """
        super().stopService()
        if self._availability is not None:
            self._availability.stop()
        self._ended.clear()
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
        Whether Redis can serve now: both pools have a connection, and it
        does not refuse commands.
        """
        return self._availability is not None and self._availability.available

    def when_available(self, within: float) -> Deferred[bool]:
        """
        Fire with true as soon as Redis can serve, having hurried the
        connections being made; with false at once if no attempt is under
        way, or after C{within} seconds.
        """
        if self._availability is None:
            return succeed(False)
        return self._availability.when_available(within)

    def _probe(self) -> Deferred:
        return self._script(scripts.PROBE, [keys.probe(self.worker_id)], [])

    def _call(self, *command, data: bool = False) -> Deferred:
        """
        Run one command (on the chunk connection with C{data}); fail with
        L{Unavailable} when the store is stopped, or when Redis has not
        answered within C{op_timeout}, rather than wait for as long as Redis
        is unreachable.
        """
        try:
            factory = self._factory(data)
        except Unavailable:
            self.metrics.store_errors.inc()
            return fail()
        return self._guard(factory.handler.execute_command(*command))

    def _script(self, script: str, names: list, args: list, data: bool = False) -> Deferred:
        try:
            factory = self._factory(data)
        except Unavailable:
            self.metrics.store_errors.inc()
            return fail()
        return self._guard(factory.handler.eval(script, names, args))

    def _factory(self, data: bool) -> PoolFactory:
        """
        The pool for a command.  A command waits (at most C{op_timeout}) for
        a connection being made; with none, and none being made, it fails at
        once: a player leaving, say, is not to wait the timeout out for a
        Redis known to be down.
        """
        factory = self._data if data else self._pool
        if factory is None:
            raise Unavailable("the Redis store is not running", retry_after=RETRY_AFTER)
        if factory.size == 0 and not factory.trying:
            raise Unavailable("the Redis store is unavailable", retry_after=RETRY_AFTER)
        return factory

    def _guard(self, d: Deferred) -> Deferred:
        """
        Time C{d} out on our reactor after C{op_timeout}, and turn every
        failure that says Redis cannot serve now into L{Unavailable}, which
        callers expect and ride out, whether Redis is unreachable, slow, or
        refusing writes for a while (a full memory, a demoted master, a
        dataset loading); any other error reply is a bug, and stays itself.
        A refusal makes the store unavailable until Redis serves again.
        """

        def failed(failure):
            self.metrics.store_errors.inc()
            refused = refusal(failure)
            if refused is not None and self._availability is not None:
                self._availability.refused(refused)
            return unavailable(failure)

        return d.addTimeout(self.op_timeout, self.reactor).addErrback(failed)

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

    # Streams

    def put_stream(self, key: str, fields: Fields) -> Deferred[None]:
        """
        The metadata always carries the stream's key, as the embedded
        store's does: listings identify streams by it.
        """
        fields = {Meta.KEY.value: key, **_plain(fields)}
        return self._script(
            scripts.PUT_STREAM, [keys.metadata(key)], [self.stream_ttl_ms, *flatten(fields)]
        ).addCallback(lambda _: None)

    def get_stream(self, key: str) -> Deferred[dict | None]:
        return self._call("HGETALL", keys.metadata(key)).addCallback(
            lambda flat: pairs(flat) or None
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
                keys.hls_segments(key),
            ],
            [
                keys.buffer_chunk_prefix(key),
                self.buffer_chunks,
                keys.client_prefix(key),
                self.worker_id,
            ],
        ).addCallback(lambda _: None)
