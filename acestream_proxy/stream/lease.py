"""
A stream's owner lease, as one worker sees it.

The owner holds C{…:owner} (SET NX PX) and renews it every third of a lease;
renewing also keeps the stream's other keys alive.  A worker that is not the
owner asks, every third of C{worker_timeout}, whether the lease is free and
the stream orphaned, or held by a worker known dead, and takes it then.  The stream's lease timer is this component's
one driver: nothing else renews or takes it.
"""

import enum

import attrs

from ..store.base import Store


class Renewal(enum.Enum):
    #: Still ours.
    KEPT = "kept"
    #: It had lapsed (Redis restarted empty) and is ours again: the keys
    #: Redis lost must be written back.
    RETAKEN = "retaken"
    #: Another worker holds it.
    LOST = "lost"


@attrs.define(eq=False)
class OwnerLease:
    """
    @ivar until: the time up to which the lease is surely ours: Redis set
        its expiry after we asked, so it lasts at least a lease from then.
    """

    key: str
    store: Store
    clock: object
    duration: float
    until: float = 0.0
    _orphaned_at: float | None = attrs.field(default=None, init=False)

    def taken(self, asked_at: float) -> None:
        """
        The lease was acquired (by a request made at C{asked_at}).
        """
        self.until = asked_at + self.duration

    def due(self) -> bool:
        """
        Whether the lease should be renewed now: a third of it has passed
        since it was last confirmed.
        """
        return self.clock.seconds() >= self.until - self.duration * 2 / 3 - 1e-6

    def safe(self) -> bool:
        """
        Whether an append now surely lands while the lease is ours: more
        than a third of a lease is left, so a renewal is not overdue.
        """
        return self.clock.seconds() <= self.until - self.duration / 3

    async def renew(self) -> Renewal:
        """
        Renew the lease, or take it again if it is free.
        """
        asked_at = self.clock.seconds()
        if await self.store.renew_owner(self.key):
            self.taken(asked_at)
            return Renewal.KEPT
        if await self.store.acquire_owner(self.key):
            self.taken(asked_at)
            return Renewal.RETAKEN
        return Renewal.LOST

    async def take_if_orphaned(self) -> bool:
        """
        Take the lease if the stream's owner is gone: its lease is free, and
        either the stream's metadata is there (the owner died or handed
        over) or it has been missing for a whole lease.  Missing metadata
        with a free lease is what a Redis restart looks like, and the owner,
        if alive, writes both back within a third of a lease; taking over
        sooner would start a second engine session.
        """
        owner = await self.store.get_owner(self.key)
        if owner is not None:
            self._orphaned_at = None
            return await self._take_from_dead(owner)
        if await self.store.get_stream(self.key) is None:
            now = self.clock.seconds()
            if self._orphaned_at is None:
                self._orphaned_at = now
            if now - self._orphaned_at < self.duration:
                return False
        asked_at = self.clock.seconds()
        if not await self.store.acquire_owner(self.key):
            return False
        self._orphaned_at = None
        self.taken(asked_at)
        return True

    async def _take_from_dead(self, owner: str) -> bool:
        """
        Take the lease of an owner whose worker is known dead (its liveness
        key expired), without waiting out its lease.
        """
        if owner == self.store.worker_id or await self.store.is_alive(owner):
            return False
        asked_at = self.clock.seconds()
        if not await self.store.take_owner_from(self.key, owner):
            return False
        self.taken(asked_at)
        return True

    def release(self):
        """
        Give the lease up, if it is ours; a L{Deferred}.
        """
        return self.store.release_owner(self.key)
