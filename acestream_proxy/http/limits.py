"""
Limits per client address: open connections, and new streams per minute.

A household behind NAT is one address with a few players, so the limits are
sized for that; what they stop is one client holding many descriptors, or
making the engines open many swarms, by itself.  Loopback clients are not
limited by default: they are the machine itself, or a reverse proxy on it
that stands for every client.
"""

import ipaddress
import math
from collections import Counter
from typing import Callable

import attrs

from ..errors import Unavailable

#: The window of C{max_new_streams_per_address}, in seconds.
NEW_STREAM_WINDOW = 60.0


def is_loopback(host: str) -> bool:
    """
    Whether C{host} is a loopback address, an IPv4 one seen as
    C{::ffff:a.b.c.d} by a dual-stack listener included (which
    L{ipaddress} alone does not count as loopback).
    """
    address = _address(host)
    return address is not None and address.is_loopback


def _address(host: str):
    """
    The address C{host} names, an IPv4-mapped IPv6 address as its IPv4
    address, or L{None} for something else (a UNIX socket's path).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


@attrs.define(eq=False)
class ClientLimits:
    """
    Connections and new streams per client address, shared by the site
    (which counts connections) and the routes (which count new streams).

    A limit of 0 is no limit.  Keys are addresses in their canonical
    spelling; L{None} is a client that is not limited.

    @ivar clock: the time source of the new-stream window (the proxy's
        reactor, or a test's clock).
    @ivar exempt: which hosts are not limited (by default loopback ones).
    """

    max_connections: int
    max_new_streams: int
    clock: object
    exempt: Callable[[str], bool] = is_loopback
    window: float = NEW_STREAM_WINDOW
    _connections: Counter = attrs.field(factory=Counter, init=False)
    _starts: dict = attrs.field(factory=dict, init=False)
    _swept_at: float = attrs.field(default=0.0, init=False)

    @classmethod
    def from_tuning(cls, tuning, clock, exempt: Callable[[str], bool] = is_loopback):
        return cls(
            tuning.max_connections_per_address,
            tuning.max_new_streams_per_address,
            clock,
            exempt,
        )

    def key(self, address) -> str | None:
        """The key of a client's L{IAddress}, or L{None} if it is not limited."""
        host = getattr(address, "host", None)
        return None if host is None else self.key_of_host(host)

    def key_of_host(self, host: str) -> str | None:
        address = _address(host)
        if address is None or self.exempt(str(address)):
            return None
        return str(address)

    # Connections

    def admit_connection(self, key: str | None) -> bool:
        """
        Count a new connection of C{key}, unless it already has as many as
        it may; whether it was admitted (and must be released).
        """
        if key is None:
            return True
        if self.max_connections and self._connections[key] >= self.max_connections:
            return False
        self._connections[key] += 1
        return True

    def release_connection(self, key: str | None) -> None:
        if key is None:
            return
        self._connections[key] -= 1
        if self._connections[key] <= 0:
            del self._connections[key]

    def connections(self, key: str) -> int:
        return self._connections.get(key, 0)

    # New streams

    def take_new_stream(self, key: str | None, stream: str) -> None:
        """
        Count stream C{stream} as started for C{key}, or refuse it with
        L{Unavailable} when C{key} started as many others within the window
        (C{retry_after}: when the oldest of them leaves it).  A stream that
        C{key} already started within the window counts once: players of one
        household asking for a stream at the same moment, or a player
        retrying, open one swarm, not several.
        """
        if key is None or not self.max_new_streams:
            return
        now = self.clock.seconds()
        self._sweep(now)
        started = self._starts.setdefault(key, {})
        _forget_before(started, now - self.window)
        if stream in started:
            return
        if len(started) >= self.max_new_streams:
            oldest = next(iter(started.values()))
            raise Unavailable(
                f"too many new streams from this address: at most {self.max_new_streams}"
                f" a minute",
                retry_after=max(1, math.ceil(oldest + self.window - now)),
            )
        started[stream] = now

    def _sweep(self, now: float) -> None:
        """
        Forget, once per window, the addresses with no start left in it, so
        that many addresses that came once cost nothing for long.
        """
        if now - self._swept_at < self.window:
            return
        self._swept_at = now
        stale = now - self.window
        for key in [k for k, started in self._starts.items() if _newest(started) <= stale]:
            del self._starts[key]


def _forget_before(started: dict, limit: float) -> None:
    """Drop the starts at or before C{limit}: the oldest come first."""
    while started:
        stream, at = next(iter(started.items()))
        if at > limit:
            return
        del started[stream]


def _newest(started: dict) -> float:
    return next(reversed(started.values()), -math.inf)
