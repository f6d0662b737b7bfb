"""
Whether a stream can take players yet: players that ask while it starts
wait for its first data, or for the error that stopped it.
"""

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure


@attrs.define(eq=False)
class Readiness:
    """
    @ivar result: C{False} while starting, C{True} once players may join, or
        the L{Failure} that ended the start.
    """

    result: Failure | bool = False
    _waiters: list = attrs.field(factory=list, init=False)

    def settle(self, result: Failure | bool) -> None:
        self.result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    def wait(self) -> Deferred:
        """
        Fire when players may join, or fail with the L{ProxyError} that
        stopped the stream.  Cancelling one waiter leaves the others alone.
        """
        if isinstance(self.result, Failure):
            return fail(self.result)
        if self.result:
            return succeed(None)
        waiter = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        return waiter
