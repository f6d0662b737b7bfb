"""
Keeping the client registry true: every C{heartbeat_interval} the worker
refreshes the heartbeat of each of its players that can still be written to,
and removes clients whose heartbeat is older than C{ghost_client_timeout}.

A ghost is a player whose network went away without a disconnect: its socket
stays full, its producer stays paused and it makes no progress, so its
heartbeat ages until it is removed and its connection dropped.  Each worker
judges its own players by the heartbeats it wrote, without reading them back;
the stream's owner also removes the clients of workers that stopped
heartbeating them (a worker that died), so that the clients are read once per
round, not once per worker.
"""

from typing import Callable, Iterable

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..constants import PlayerField
from ..errors import Unavailable
from ..store.base import Store
from .stream import Role


@attrs.define(eq=False)
class PlayerHeartbeats:
    """
    Its L{tick} runs every C{heartbeat_interval}, from a L{TimerService} of
    the proxy's.

    @ivar streams: returns the worker's live stream streams.
    """

    log = Logger()

    store: Store
    clock: object
    streams: Callable[[], Iterable]
    heartbeat_interval: float
    ghost_client_timeout: float
    _progress: dict = attrs.field(factory=dict, init=False)
    _beats: dict = attrs.field(factory=dict, init=False)

    def tick(self) -> Deferred:
        """
        One round of heartbeats and ghost removal.  A failure is logged and
        the next round runs as usual.
        """
        d = Deferred.fromCoroutine(self._tick())
        return d.addErrback(self._failed)

    def _failed(self, failure) -> None:
        if not failure.check(Unavailable):
            self.log.failure("client heartbeat round failed", failure)

    async def _tick(self) -> None:
        if not self.store.available:
            # Each call would wait out the store's timeout; the players keep
            # streaming meanwhile, and the first round after Redis is back
            # writes every one of them again.
            return
        now = self.clock.seconds()
        progress = {}
        for stream in list(self.streams()):
            for producer in list(stream.players):
                cid = producer.info.id
                progress[cid] = producer.bytes_sent
                moved = self._progress.get(cid, 0) != producer.bytes_sent
                if moved or not producer.paused:
                    # Written whole, so that a store that lost the client
                    # (Redis restarted empty) has it again.
                    await self.store.add_player(stream.key, cid, stream.player_fields(producer))
                    self._beats[cid] = now
            self._drop_ghosts(stream, now)
            if stream.role is Role.OWNER:
                await self._remove_ghosts(stream, now)
            await stream.refresh()
        self._progress = progress
        self._beats = {cid: beat for cid, beat in self._beats.items() if cid in progress}

    def _drop_ghosts(self, stream, now: float) -> None:
        """
        Drop this worker's players whose last heartbeat (the one written
        when they joined, if none since) is too old; leaving, each removes
        its client from the store.
        """
        oldest = now - self.ghost_client_timeout
        for producer in list(stream.players):
            client = producer.info
            if self._beats.get(client.id, client.connected_at) < oldest:
                self._ghost(client.id, stream.key)
                producer.abort()

    async def _remove_ghosts(self, stream, now: float) -> None:
        """
        The owner removes the clients other workers stopped heartbeating.
        """
        clients = await self.store.list_players(stream.key)
        oldest = now - self.ghost_client_timeout
        for cid, fields in clients.items():
            if float(fields.get(PlayerField.LAST_HEARTBEAT, 0)) >= oldest:
                continue
            if stream.player(cid) is None:
                self._ghost(cid, stream.key)
                await self.store.remove_player(stream.key, cid)

    def _ghost(self, client_id: str, key: str) -> None:
        self.log.warn(
            "client {client} of stream {key} sent no heartbeat for {timeout}s; removing it",
            client=client_id,
            key=key,
            timeout=self.ghost_client_timeout,
        )

