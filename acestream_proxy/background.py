"""
Work that runs in the background of a service: periodic calls and
fire-and-forget coroutines.

Both must survive their failures and must not outlive their service.  A
L{LoopingCall} that raises stops for good (a Redis error reply would end a
stream's lease renewal), and a coroutine nobody awaits loses its traceback:
so every periodic call runs through L{Periodic}, which logs a failure (once
per L{QUIET} seconds for the same kind) and keeps its schedule, and every
fire-and-forget call goes through L{Tasks.run}, which logs its failure and
remembers it until it ends, so that stopping its owner can cancel it.
"""

import inspect
from typing import Any, Callable, Coroutine

import attrs
from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .errors import Unavailable

#: Seconds during which a repeated failure of one kind is counted, not logged.
QUIET = 60.0


@attrs.define(eq=False)
class FailureLog:
    """
    Logs a failure of C{what} at most once per L{QUIET} seconds per kind of
    failure.
    """

    log: Logger
    clock: Any
    what: str
    _last: dict = attrs.field(factory=dict, init=False)
    _quieted: dict = attrs.field(factory=dict, init=False)

    def __call__(self, failure: Failure) -> None:
        if failure.check(CancelledError, Unavailable):
            # A store that cannot serve is logged by the store itself, once
            # as the outage begins and once as it ends.
            return
        kind = failure.type
        now = self.clock.seconds()
        if now - self._last.get(kind, -QUIET) < QUIET:
            self._quieted[kind] = self._quieted.get(kind, 0) + 1
            return
        self._last[kind] = now
        self.log.failure(
            "{what} failed ({quieted} more since the last report)",
            failure,
            what=self.what,
            quieted=self._quieted.pop(kind, 0),
        )


@attrs.define(eq=False)
class Tasks:
    """
    The background work of one owner (a stream, the registry): each failure
    logged, each call remembered until it ends, all cancelled by
    L{cancel_all} when the owner stops.
    """

    log: Logger
    clock: Any
    what: str
    pending: set = attrs.field(factory=set, init=False)
    _kept: set = attrs.field(factory=set, init=False)
    _coroutines: dict = attrs.field(factory=dict, init=False)
    _failed: FailureLog = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._failed = FailureLog(self.log, self.clock, self.what)

    def run(self, work: Coroutine | Deferred | Callable[[], Any], keep: bool = False) -> Deferred:
        """
        Start C{work} (a coroutine, a L{Deferred}, or a callable returning
        either) and return a L{Deferred} that fires with L{None} when it
        ends, whatever its outcome.  Work to C{keep} (an engine's stop
        command, say) is not cancelled by L{cancel_all}, only waited for by
        L{settle}.
        """
        if callable(work):
            try:
                work = work()
            except Exception:
                return fail().addErrback(self._failed)
        coroutine = None
        if inspect.iscoroutine(work):
            coroutine, work = work, Deferred.fromCoroutine(work)
        if not isinstance(work, Deferred):
            return succeed(None)
        d = work
        if d.called:
            return d.addErrback(self._failed)
        self.pending.add(d)
        if keep:
            self._kept.add(d)
        if coroutine is not None:
            self._coroutines[d] = coroutine

        def done(result):
            self.pending.discard(d)
            self._kept.discard(d)
            self._coroutines.pop(d, None)
            return result

        return d.addBoth(done).addErrback(self._failed)

    def cancel_all(self) -> None:
        """
        Cancel the work under way, except work to keep and the coroutine
        that is running now (the one asking: it ends by itself).
        """
        for d in list(self.pending - self._kept):
            coroutine = self._coroutines.get(d)
            if coroutine is None or not coroutine.cr_running:
                d.cancel()

    def settle(self) -> Deferred:
        """
        Fire when every task has ended, those started meanwhile included.
        """
        if not self.pending:
            return succeed(None)
        d = DeferredList(list(self.pending), consumeErrors=True)
        return d.addCallback(lambda _: self.settle())


def periodic(interval: float, call: Callable[[], Any], clock, tasks: Tasks) -> TimerService:
    """
    A L{TimerService} running C{call} every C{interval} seconds, first at
    once, as one of C{tasks}: its failures are logged and it keeps its
    schedule, and a call still running is cancelled with its owner's tasks,
    so that stopping the timer never waits for one.
    """
    timer = _Timer(interval, tasks.run, call)
    timer.clock = clock
    return timer


class _Timer(TimerService):
    """
    A L{TimerService} that may be stopped without having been started, as
    a stream that failed before it ran is.
    """

    def stopService(self):
        if not hasattr(self, "_loop"):
            return succeed(None)
        return super().stopService()
