"""
The Redis store's owner leases and workers' liveness keys: the commands
that decide which worker owns a stream.
"""

from twisted.internet.defer import Deferred

from . import keys, scripts
from .replies import text


class LeaseCommands:
    """
    Part of L{RedisStore}: its owner leases (C{…:owner}, SET NX PX,
    renewed, compare-and-delete) and the liveness key of each worker.
    """

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
