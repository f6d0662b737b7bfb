"""
Whether the Redis store can serve now, and what happens when that changes.

The store is available while its two pools (client bookkeeping and chunks)
each have a connection and Redis is not refusing commands.  An error reply
that says Redis cannot serve now (C{READONLY} from a master demoted by a
failover, C{OOM}, C{LOADING}, C{MASTERDOWN}, C{BUSY}) makes the store
unavailable as a lost connection does, so that everything that rides out an
outage (the owner delivering chunks to its own players, heartbeats and
lease renewals waiting, new players refused at once) rides this one out
too; a probe, a write of the kind Redis refuses, tells when it serves again.

An outage is logged once when it begins, with its first cause, and once
when it ends: not once per failed command or connection attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .connection import HURRY_GAP

#: Seconds between probes while Redis refuses commands.
PROBE_INTERVAL = 1.0


@attrs.define(eq=False)
class Waiter:
    deferred: Deferred
    timer: object


@attrs.define(eq=False)
class Availability:
    """
    @ivar factories: the pools that must each have a connection.
    @ivar probe: sends a write of the kind Redis refuses when it cannot
        serve; its L{Deferred} fails with the refusal.
    @ivar back: called whenever the store becomes available (again).
    """

    log: Logger
    reactor: object
    where: str
    factories: Sequence
    probe: Callable[[], Deferred]
    back: Callable[[], None]
    running: bool = True
    #: Why Redis refuses commands now, or L{None}.
    refusing: str | None = None
    _probing: Deferred | None = attrs.field(default=None, init=False)
    _probed_at: float = attrs.field(default=float("-inf"), init=False)
    _probe_call: object = attrs.field(default=None, init=False)
    _was_available: bool = attrs.field(default=False, init=False)
    _connected_once: bool = attrs.field(default=False, init=False)
    _outage_since: float | None = attrs.field(default=None, init=False)
    _why: str | None = attrs.field(default=None, init=False)
    _failures: int = attrs.field(default=0, init=False)
    _waiters: list = attrs.field(factory=list, init=False)
    _changing: bool = attrs.field(default=False, init=False)
    _again: bool = attrs.field(default=False, init=False)

    @property
    def connected(self) -> bool:
        return all(factory.size > 0 for factory in self.factories)

    @property
    def available(self) -> bool:
        return self.running and self.refusing is None and self.connected

    @property
    def trying(self) -> bool:
        """
        Whether an attempt that could make the store available is under
        way: a connection being made for every pool that has none, and a
        probe if Redis refuses.
        """
        for factory in self.factories:
            if factory.size == 0 and not factory.trying:
                return False
        return self.refusing is None or self._probing is not None

    # What the connections and commands report

    def failed(self, why: str) -> None:
        """
        An attempt to connect, or a connection, failed.
        """
        self._why = why
        self._failures += 1

    def refused(self, why: str) -> None:
        """
        Redis answered a command with an error reply that says it cannot
        serve now: unavailable until a probe is served.
        """
        self.failed(f"it refuses commands ({why})")
        if self.refusing is None:
            self.refusing = why
            self._schedule_probe(PROBE_INTERVAL)
        self.changed()

    def changed(self) -> None:
        """
        A connection came or went, or Redis refused or served a probe: log
        the outage beginning or ending, answer whoever waits.
        """
        if self._changing:
            self._again = True
            return
        self._changing = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._update()
        finally:
            self._changing = False

    def _update(self) -> None:
        available = self.available
        if available != self._was_available:
            self._was_available = available
            if available:
                self._served_again()
        if not available and self.running and self._outage_since is None:
            if self._connected_once or self._why is not None:
                self._outage_began()
        if self._waiters:
            if not available:
                self.hurry()
            if available or not self.trying or not self.running:
                self._answer(available)

    def _outage_began(self) -> None:
        self._outage_since = self.reactor.seconds()
        self._failures = 0
        self.log.warn(
            "Redis at {where} cannot serve: {why}; until it does, new players are"
            " refused and the players already here are served by this worker alone",
            where=self.where,
            why=self._why or "the connection was lost",
        )

    def _served_again(self) -> None:
        if self._outage_since is not None:
            self.log.info(
                "Redis at {where} serves again after {seconds:.1f}s"
                " ({failures} more failures meanwhile)",
                where=self.where,
                seconds=self.reactor.seconds() - self._outage_since,
                failures=self._failures,
            )
        elif not self._connected_once:
            self.log.info("connected to Redis at {where}", where=self.where)
        self._connected_once = True
        self._outage_since, self._why, self._failures = None, None, 0
        self.back()

    # Refusals

    def _schedule_probe(self, delay: float) -> None:
        if self._probe_call is None and self.running:
            self._probe_call = self.reactor.callLater(delay, self._probe)

    def _probe(self) -> None:
        self._probe_call = None
        if self.refusing is None or self._probing is not None or not self.running:
            return
        self._probed_at = self.reactor.seconds()
        self._probing = probing = self.probe()

        def served(_):
            self.refusing = None

        def ended(_):
            self._probing = None
            if self.refusing is not None:
                self._schedule_probe(PROBE_INTERVAL)
            self.changed()

        probing.addCallbacks(served, lambda _: None).addBoth(ended)

    # Waiting for the store

    def hurry(self) -> None:
        """
        Try now, rather than at the end of a back-off, to connect the pools
        that have no connection, and to probe a Redis that refuses.
        """
        for factory in self.factories:
            if factory.size == 0:
                factory.hurry()
        if (
            self.refusing is not None
            and self._probing is None
            and self.reactor.seconds() - self._probed_at >= HURRY_GAP
        ):
            if self._probe_call is not None:
                self._probe_call.cancel()
                self._probe_call = None
            self._probe()

    def when_available(self, within: float) -> Deferred[bool]:
        """
        Fire with true as soon as the store is available, or with false
        when it surely is not about to be: no attempt is under way (after
        hurrying one), or C{within} seconds have passed.
        """
        if self.available:
            return succeed(True)
        if not self.running:
            return succeed(False)
        self.hurry()
        if self.available or not self.trying:
            return succeed(self.available)
        waiter = Waiter(Deferred(), None)
        waiter.timer = self.reactor.callLater(within, self._give_up, waiter)
        self._waiters.append(waiter)
        return waiter.deferred

    def _give_up(self, waiter: Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            waiter.deferred.callback(False)

    def _answer(self, result: bool) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(result)

    def stop(self) -> None:
        """
        The store stops: no more probes, and nobody waits.
        """
        self.running = False
        if self._probe_call is not None:
            self._probe_call.cancel()
            self._probe_call = None
        if self._probing is not None:
            self._probing.cancel()
        self._answer(False)
