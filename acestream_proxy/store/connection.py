"""
Connections to Redis for the store: where Redis is and how to log in to it,
connections that come back by themselves whatever happened, and which
failures mean that Redis cannot serve now.

txredisapi's factories are kept for their pools and commands, but not for
how they connect: when the first commands of a new connection (C{AUTH},
C{SELECT}) fail or time out, a txredisapi factory stops reconnecting for
good, and Redis being frozen longer than the command timeout, or answering
C{-LOADING} after a restart, left the store down until the daemon was
restarted.  Here each connection of a pool is a L{ClientService} of the
store's reactor: a connection whose greeting fails is closed and tried
again after a short back-off, whatever the failure, until the store stops.
"""

from __future__ import annotations

import random
import re
from typing import Callable

import attrs
import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import Unavailable
from . import keys
from .address import RedisAddress
from .base import RETRY_AFTER
from .replies import text

#: Seconds between attempts to connect: short, so that the store is back
#: within a couple of seconds of Redis answering again, even after a long
#: outage; the random part keeps the workers' attempts apart.
_BACKOFF = backoffPolicy(
    initialDelay=0.2, maxDelay=1.5, factor=2.0, jitter=lambda: random.uniform(0, 0.5)
)

#: An attempt may be hurried (L{_Slot.hurry}) this many seconds after the
#: last one began, not sooner: a player waiting for the store may make the
#: store try again at once, but many players may not make it try in a loop.
HURRY_GAP = 0.5


def reason(failure: Failure | BaseException | str) -> str:
    """
    A failure in one line, for a log or a report.
    """
    if isinstance(failure, Failure):
        failure = failure.value
    if isinstance(failure, (TimeoutError, txredisapi.TimeoutError, ConnectionAborted)):
        # Replies that do not come in time close their connection.
        return "no answer in time"
    return (" ".join(str(failure).split()).rstrip(".") or type(failure).__name__)[:300]


class _Greeting:
    """
    What the store's connections do before they join their pool: log in,
    select the database, and PING, which a Redis still loading its dataset
    answers with C{-LOADING} (it serves C{AUTH} and C{SELECT} meanwhile),
    so that a connection joins only when Redis serves.  A greeting that
    fails or times out closes the connection; its L{_Slot} tries again.
    """

    #: The greeting was served: the connection is (or was) in its pool.
    greeted = False
    #: The greeting failed, and the store was told why.
    failure_told = False

    def connectionMade(self):
        Deferred.fromCoroutine(self._greet())

    async def _greet(self) -> None:
        factory = self.factory
        address = factory.address
        try:
            if address.password is not None:
                login = [address.username] if address.username else []
                await self.execute_command("AUTH", *login, address.password)
            if factory.db:
                await self.execute_command("SELECT", factory.db)
            await self.execute_command("PING")
        except Exception as e:
            if not isinstance(e, txredisapi.ConnectionError) or isinstance(
                e, txredisapi.TimeoutError
            ):
                # A lost connection is told by connectionLost, with its cause.
                factory.failed(reason(e))
                self.failure_told = True
            self.transport.abortConnection()
            return
        self.greeted = True
        # With no password and no database of its own, txredisapi's greeting
        # only marks the connection ready, which puts it in the pool.
        super().connectionMade()


class _Protocol(_Greeting, txredisapi.RedisProtocol):
    pass


class _SubscriberProtocol(_Greeting, txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.store._message(text(channel), message)


@implementer(IStreamClientEndpoint)
@attrs.define(eq=False)
class _WatchedEndpoint:
    """
    The endpoint of a L{_Slot}, telling it when an attempt begins and how
    it ends.
    """

    slot: _Slot
    endpoint: IStreamClientEndpoint

    def connect(self, protocolFactory) -> Deferred:
        slot = self.slot
        slot.connecting, slot.backing_off = True, False
        slot.started_at = slot.factory.reactor.seconds()

        def done(result):
            slot.connecting = False
            if isinstance(result, Failure) and not result.check(CancelledError):
                slot.factory.failed(reason(result))
            slot.factory.changed()
            return result

        return self.endpoint.connect(protocolFactory).addBoth(done)


@attrs.define(eq=False)
class _SlotFactory:
    """
    Builds a L{_Slot}'s protocols with its factory, and tells the slot when
    a connection is lost.
    """

    slot: _Slot

    def buildProtocol(self, addr):
        slot = self.slot
        protocol = slot.factory.buildProtocol(addr)
        slot.protocol = protocol
        lost = protocol.connectionLost

        def notify(why):
            # Why, first: the pool's losing it may end the store's
            # availability, and the outage is logged with its cause.
            slot._losing(protocol, why)
            try:
                return lost(why)
            finally:
                slot._lost(protocol)

        protocol.connectionLost = notify
        return protocol

    def __getattr__(self, name):
        return getattr(self.slot.factory, name)


class _QuietClientService(ClientService):
    """
    A L{ClientService} that does not log each attempt: while Redis is down
    that would be a line per connection every second or two.  The store
    logs the outage once instead.
    """

    _log = Logger(observer=lambda event: None)


@attrs.define(eq=False)
class _Slot:
    """
    One connection of a pool, kept up by a L{ClientService} on the store's
    reactor, with a short back-off.

    @ivar protocol: the connection being greeted or in use, if any.
    @ivar connecting: an attempt to connect is under way.
    @ivar backing_off: waiting before the next attempt.
    @ivar rejected: connections made in a row whose greeting failed; the
        back-off grows with them, as with failed attempts to connect.
    """

    factory: _Connections
    endpoint: IStreamClientEndpoint
    protocol: object = None
    connecting: bool = False
    backing_off: bool = False
    rejected: int = 0
    started_at: float = float("-inf")
    service: ClientService = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.service = _QuietClientService(
            _WatchedEndpoint(self, self.endpoint),
            _SlotFactory(self),
            retryPolicy=self._delay,
            clock=self.factory.reactor,
        )

    @property
    def trying(self) -> bool:
        """
        Connecting, greeting Redis on a new connection, or about to put it
        in the pool.
        """
        return self.connecting or (
            self.protocol is not None and self.protocol not in self.factory.pool
        )

    def start(self) -> None:
        self.service.startService()

    def stop(self) -> Deferred:
        """
        Stop trying and close the connection.
        """
        return self.service.stopService()

    # txredisapi's factories call this to stop reconnecting (after QUIT, for
    # one): the store never stops short of stopping.
    stopTrying = stop

    def hurry(self) -> None:
        """
        Connect now rather than at the end of the back-off, unless the last
        attempt began less than L{HURRY_GAP} ago.
        """
        now = self.factory.reactor.seconds()
        if self.backing_off and self.service.running and now - self.started_at >= HURRY_GAP:
            self.backing_off = False
            self.service.stopService()
            self.service.startService()

    def _delay(self, attempt: int) -> float:
        self.backing_off = True
        return _BACKOFF(max(attempt, self.rejected))

    def _losing(self, protocol, why: Failure) -> None:
        if protocol.greeted:
            self.rejected = 0
            if why.check(ConnectionAborted):
                # Closed by us: a reply did not come in time.
                self.factory.failed("no answer in time")
            else:
                self.factory.failed(f"the connection was lost ({reason(why)})")
        else:
            self.rejected += 1
            if not protocol.failure_told:
                self.factory.failed(reason(why))

    def _lost(self, protocol) -> None:
        if self.protocol is protocol:
            self.protocol = None
        self.factory.changed()


class _Connections:
    """
    What the store's factories share: protocols and timers on the store's
    reactor, one L{_Slot} per connection, and a word to the store (its
    C{on_change} and C{on_failure}) whenever a connection comes or goes or
    an attempt fails.
    """

    reactor: object
    address: RedisAddress
    db: int = 0
    on_change: Callable[[], None] = staticmethod(lambda: None)
    on_failure: Callable[[str], None] = staticmethod(lambda why: None)

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        # The protocol's class takes callLater from the global reactor, and
        # times replies out with it.
        protocol.callLater = self.reactor.callLater
        return protocol

    def _connectionReady(self, conn):
        # txredisapi waits a turn of the global reactor before the pool
        # takes a new connection; this waits a turn of ours.
        self.reactor.callLater(0, self.addConnection, conn)

    def startConnecting(self, endpoint: IStreamClientEndpoint) -> None:
        """
        Open and keep up C{poolsize} connections to C{endpoint}.
        """
        for _ in range(self.poolsize):
            slot = _Slot(self, endpoint)
            self.slots.append(slot)
            slot.start()

    def addConnection(self, conn):
        super().addConnection(conn)
        self.changed()

    def delConnection(self, conn):
        super().delConnection(conn)
        self.changed()

    @property
    def trying(self) -> bool:
        return any(slot.trying for slot in self.slots)

    def hurry(self) -> None:
        for slot in self.slots:
            slot.hurry()

    def changed(self) -> None:
        if not self.disconnectCalled:
            self.on_change()

    def failed(self, why: str) -> None:
        if not self.disconnectCalled:
            self.on_failure(why)


class PoolFactory(_Connections, txredisapi.RedisFactory):
    """
    A pool of connections to database C{address.db}, as
    C{txredisapi.lazyConnectionPool} makes one, but connected by L{_Slot}s.
    """

    protocol = _Protocol

    def __init__(self, reactor, address: RedisAddress, poolsize: int, reply_timeout: float) -> None:
        handler = txredisapi.ConnectionHandler
        if address.path is not None:
            handler = txredisapi.UnixConnectionHandler
        # No password and no database for txredisapi: the greeting is ours.
        super().__init__(
            address.describe(),
            None,
            poolsize,
            isLazy=True,
            handler=handler,
            charset=None,
            replyTimeout=reply_timeout,
            convertNumbers=False,
        )
        self.reactor = reactor
        self.address = address
        self.db = address.db


class SubscriberFactory(_Connections, txredisapi.SubscriberFactory):
    """
    Subscribes every (re)connection to all stream event channels.
    """

    protocol = _SubscriberProtocol

    def __init__(self, store, reply_timeout: float) -> None:
        super().__init__(isLazy=True)
        self.store = store
        self.reactor = store.reactor
        self.address = store.address
        # The greeting times out; subscribing waits as long as it takes.
        self.replyTimeout = reply_timeout

    def addConnection(self, conn):
        super().addConnection(conn)
        if conn.connected:
            conn.psubscribe(keys.EVENTS_PATTERN).addErrback(
                lambda f: self.store.log.warn("could not subscribe to events: {why}", why=reason(f))
            )


#: The error replies of a Redis that cannot serve now but will again: out of
#: memory, a replica (a master demoted by failover), loading its dataset,
#: without its master, or busy with a long script.  Inside a script, Redis 6
#: reports them as "Error running script (...): @user_script: 1: -OOM ...".
_CANNOT_SERVE_NOW = re.compile(r"(?:^|: -)(READONLY|OOM|LOADING|MASTERDOWN|BUSY)\b")


def refusal(failure: Failure) -> str | None:
    """
    If C{failure} is an error reply of a Redis that cannot serve now, the
    reply from its reason on (C{READONLY You can't write...}), without
    what a script adds before it; else L{None}.
    """
    if failure.check(txredisapi.ResponseError):
        message = str(failure.value)
        refused = _CANNOT_SERVE_NOW.search(message)
        if refused is not None:
            return reason(message[refused.start(1) :])
    return None


def unavailable(failure):
    """
    L{Unavailable} (with a C{Retry-After} for the player it refuses) for a
    failure that says Redis cannot serve now; any other failure as it is.
    """
    if failure.check(TimeoutError, txredisapi.ConnectionError):
        raise Unavailable(
            "the Redis store is unavailable", retry_after=RETRY_AFTER
        ) from failure.value
    why = refusal(failure)
    if why is not None:
        raise Unavailable(
            f"the Redis store cannot serve now ({why.split()[0]})", retry_after=RETRY_AFTER
        ) from failure.value
    return failure
