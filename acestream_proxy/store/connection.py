"""
Connections to Redis for the store: where Redis is, txredisapi's factories
made to run on the store's reactor, and which failures mean that Redis
cannot serve now.
"""

import re
from urllib.parse import parse_qs, urlsplit

import attrs
import txredisapi
from twisted.internet.defer import TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

from ..errors import Unavailable
from . import keys


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


def text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


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


class PoolFactory(_OnReactor, txredisapi.RedisFactory):
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
        self.factory.store._message(text(channel), message)


class SubscriberFactory(_OnReactor, txredisapi.SubscriberFactory):
    """
    Subscribes every (re)connection to all stream event channels.
    """

    protocol = _Subscriber

    def __init__(self, store) -> None:
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


def unavailable(failure):
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
