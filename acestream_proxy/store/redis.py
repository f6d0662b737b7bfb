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
import re
from urllib.parse import parse_qs, urlsplit

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, fail
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.logger import Logger

from ..constants import Event, Meta
from ..errors import Unavailable
from . import keys
from .base import Fields, Listeners, NotOwner, _plain

# Only the lease holder may append: a stale owner (one that stood still past
# its lease) is refused, so its chunks cannot land after the new owner's.
#
# The chunk_added message is encoded by cjson, so that no worker id can break
# it.  Its time, ARGV[8], is the JSON number Python wrote, put in whole: cjson
# prints numbers with at most 14 significant digits, which would round a Unix
# time to 100 microseconds and print a whole second as an integer.
_APPEND = """
if redis.call('GET', KEYS[3]) ~= ARGV[7] then return -1 end
local index = redis.call('INCR', KEYS[1])
redis.call('SET', ARGV[4] .. index, ARGV[1], 'PX', ARGV[2])
local old = index - tonumber(ARGV[3])
if old > 0 then redis.call('DEL', ARGV[4] .. old) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local fields = cjson.encode({event = ARGV[5], worker_id = ARGV[7], index = index})
redis.call('PUBLISH', KEYS[2], '{"ts": ' .. ARGV[8] .. ', ' .. string.sub(fields, 2))
return index
"""

# Reads from the oldest chunk still in the window at or after ARGV[1]: chunks
# that left the window or expired are skipped, not counted against the limit,
# as the embedded buffer does.  One MGET per batch of at most 500 names keeps
# the work per chunk one command and the arguments within what unpack takes.
_READ = """
local index = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit = tonumber(ARGV[2])
local i = math.max(1, tonumber(ARGV[1]), index - tonumber(ARGV[3]) + 1)
local found = {}
while i <= index and #found < 2 * limit do
  local last = math.min(index, i + math.min(limit - #found / 2, 500) - 1)
  local names = {}
  for n = i, last do names[#names + 1] = ARGV[4] .. n end
  local values = redis.call('MGET', unpack(names))
  for n = 1, #names do
    if values[n] then
      found[#found + 1] = i + n - 1
      found[#found + 1] = values[n]
    end
  end
  i = last + 1
end
return found
"""

# KEYS[1] is the buffer index, ARGV[1] the chunk key prefix, ARGV[2] the
# window size: every chunk the window can hold goes with the index.
_DELETE_CHUNKS = """
local index = tonumber(redis.call('GET', KEYS[1]) or '0')
for i = math.max(1, index - tonumber(ARGV[2]) + 1), index do
  redis.call('DEL', ARGV[1] .. i)
end
redis.call('DEL', KEYS[1])
"""

_DELETE_BUFFER = _DELETE_CHUNKS + "return 1\n"

# KEYS: buffer index, owner, metadata, clients, last disconnect time.
_DELETE_STREAM = _DELETE_CHUNKS + """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('DEL', ARGV[3] .. id)
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Adding a client replaces its hash whole, as the embedded store does.
_ADD_CLIENT = """
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

_UPDATE_CLIENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

_REMOVE_CLIENT = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return redis.call('SCARD', KEYS[1])
"""

_LIST_CLIENTS = """
local found = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(found, id)
  table.insert(found, redis.call('HGETALL', ARGV[1] .. id))
end
return found
"""

_PUT_STREAM = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Renewing the lease also keeps the stream's other keys alive.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@attrs.frozen
class RedisAddress:
    """
    Where Redis is: C{redis://host[:port][/db]} or C{unix:///path[?db=N]}.
    """

    host: str | None
    port: int
    path: str | None
    db: int

    @classmethod
    def parse(cls, url: str) -> "RedisAddress":
        parts = urlsplit(url)
        if parts.scheme == "unix":
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            return cls(None, 0, parts.path, db)
        db = int(parts.path.strip("/") or 0)
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, None, db)

    def endpoint(self, reactor, timeout: float):
        """
        Where to connect, on C{reactor}.  A host name may resolve to IPv6 as
        well as IPv4 addresses: L{HostnameEndpoint} tries them all.
        """
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)

    def describe(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}/{self.db}"


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _pairs(flat: list) -> dict:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _flatten(fields: Fields) -> list:
    flat = []
    for name, value in _plain(fields).items():
        flat += [name, value if isinstance(value, (bytes, str)) else repr(value)]
    return flat


class _OnReactor:
    """
    Gives each protocol of a txredisapi factory the timers of C{reactor}:
    the protocol's class takes C{callLater} from the global reactor, and it
    times out replies with it.
    """

    reactor: object

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.callLater = self.reactor.callLater
        return protocol


class _PoolFactory(_OnReactor, txredisapi.RedisFactory):
    """
    A pool of connections, built as C{txredisapi.lazyConnectionPool} builds
    one, whose timers run on the store's reactor; L{RedisStore} connects it
    through an endpoint of that reactor.
    """

    def __init__(self, reactor, address: RedisAddress, poolsize: int, reply_timeout: float) -> None:
        handler = txredisapi.ConnectionHandler
        if address.path is not None:
            handler = txredisapi.UnixConnectionHandler
        super().__init__(
            address.describe(),
            address.db,
            poolsize,
            isLazy=True,
            handler=handler,
            charset=None,
            replyTimeout=reply_timeout,
            convertNumbers=False,
        )
        self.reactor = reactor


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.store._message(_text(channel), message)


class _SubscriberFactory(_OnReactor, txredisapi.SubscriberFactory):
    """
    Subscribes every (re)connection to all stream event channels.
    """

    protocol = _Subscriber

    def __init__(self, store: "RedisStore") -> None:
        super().__init__(isLazy=True)
        self.store = store
        self.reactor = store.reactor

    def addConnection(self, conn):
        super().addConnection(conn)
        if conn.connected:
            conn.psubscribe(keys.EVENTS_PATTERN).addErrback(
                lambda f: self.store.log.warn("could not subscribe to events: {f}", f=f)
            )


#: The error replies of a Redis that cannot serve now but will again: out of
#: memory, a replica (a master demoted by failover), loading its dataset,
#: without its master, or busy with a long script.  Inside a script, Redis 6
#: reports them as "Error running script (...): @user_script: 1: -OOM ...".
_CANNOT_SERVE_NOW = re.compile(r"(?:^|: -)(READONLY|OOM|LOADING|MASTERDOWN|BUSY)\b")


def _unavailable(failure):
    """
    L{Unavailable} for a failure that says Redis cannot serve now; any
    other failure as it is.
    """
    if failure.check(TimeoutError, txredisapi.ConnectionError):
        raise Unavailable("the Redis store is unavailable") from failure.value
    if failure.check(txredisapi.ResponseError):
        refused = _CANNOT_SERVE_NOW.search(str(failure.value))
        if refused is not None:
            reason = refused.group(1)
            raise Unavailable(f"the Redis store cannot serve now ({reason})") from failure.value
    return failure


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
            _APPEND,
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
            _READ,
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
            _DELETE_BUFFER,
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
    op_timeout: float = 5.0
    buffer: RedisRingBuffer = attrs.field(init=False)
    address: RedisAddress = attrs.field(init=False)
    _pool: _PoolFactory | None = attrs.field(default=None, init=False)
    _data: _PoolFactory | None = attrs.field(default=None, init=False)
    _subscriber: _SubscriberFactory | None = attrs.field(default=None, init=False)
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
        self._pool = self._connect(_PoolFactory(self.reactor, self.address, 2, self.op_timeout))
        self._data = self._connect(_PoolFactory(self.reactor, self.address, 1, self.op_timeout))
        self._subscriber = self._connect(_SubscriberFactory(self))
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
        return d.addTimeout(self.op_timeout, self.reactor).addErrback(_unavailable)

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
        Take the stream's owner lease if nobody holds it.
        """
        d = self._call(
            "SET", keys.owner(key), self.worker_id, "NX", "PX", int(self.owner_lease * 1000), data=True
        )
        return d.addCallback(lambda reply: reply is not None)

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
            _RENEW, names, [self.worker_id, int(self.owner_lease * 1000), self.stream_ttl_ms], data=True
        )
        return d.addCallback(lambda reply: int(reply) == 1)

    def release_owner(self, key: str) -> Deferred[bool]:
        d = self._script(_RELEASE, [keys.owner(key)], [self.worker_id], data=True)
        return d.addCallback(lambda reply: int(reply) == 1)

    def get_owner(self, key: str) -> Deferred[str | None]:
        return self._call("GET", keys.owner(key), data=True).addCallback(
            lambda v: _text(v) if v is not None else None
        )

    # Streams

    def put_stream(self, key: str, fields: Fields) -> Deferred[None]:
        """
        The metadata always carries the stream's key, as the embedded
        store's does: listings identify streams by it.
        """
        fields = {Meta.KEY.value: key, **_plain(fields)}
        return self._script(
            _PUT_STREAM, [keys.metadata(key)], [self.stream_ttl_ms, *_flatten(fields)]
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
            names.update(_text(n) for n in found)
            if _text(cursor) == "0":
                break
        streams = []
        for name in sorted(names):
            meta = await self.get_stream(keys.key_of(name))
            if meta is not None:
                streams.append(meta)
        return streams

    def delete_stream(self, key: str) -> Deferred[None]:
        return self._script(
            _DELETE_STREAM,
            [
                keys.buffer_index(key),
                keys.owner(key),
                keys.metadata(key),
                keys.clients(key),
                keys.last_client_disconnect_time(key),
            ],
            [keys.buffer_chunk_prefix(key), self.buffer_chunks, keys.client_prefix(key), self.worker_id],
        ).addCallback(lambda _: None)

    # Clients

    def add_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        return self._script(
            _ADD_CLIENT,
            [keys.clients(key), keys.client(key, client_id)],
            [int(self.ghost_client_timeout * 1000), self.stream_ttl_ms, client_id, *_flatten(fields)],
        ).addCallback(lambda _: None)

    def update_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        return self._script(
            _UPDATE_CLIENT,
            [keys.client(key, client_id)],
            [int(self.ghost_client_timeout * 1000), *_flatten(fields)],
        ).addCallback(lambda _: None)

    def remove_player(self, key: str, client_id: str) -> Deferred[int]:
        return self._script(
            _REMOVE_CLIENT, [keys.clients(key), keys.client(key, client_id)], [client_id]
        ).addCallback(int)

    def list_players(self, key: str) -> Deferred[dict[str, dict]]:
        """
        Every member of the clients set; a member whose hash has expired (its
        worker stopped heartbeating it) comes with no fields, and so with no
        heartbeat: a ghost.
        """

        def parse(flat):
            return {_text(flat[i]): _pairs(flat[i + 1]) for i in range(0, len(flat), 2)}

        return self._script(_LIST_CLIENTS, [keys.clients(key)], [keys.client_prefix(key)]).addCallback(
            parse
        )

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
