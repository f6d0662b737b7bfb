"""
Keeping the store's players true: every C{heartbeat_interval} the worker
refreshes the heartbeat of each of its players that can still be written to,
and removes players whose heartbeat is older than C{ghost_client_timeout}.

A ghost is a player whose network went away without a disconnect: its socket
stays full, its producer stays paused and it makes no progress, so its
heartbeat ages until it is removed and its connection dropped.  Each worker
judges its own players by the heartbeats it wrote, without reading them back;
the stream's owner also removes the players of workers that stopped
heartbeating them (a worker that died), so that the players are read once
per round, not once per worker.
"""

from typing import Callable, Iterable

import attrs
from twisted.logger import Logger

from ..constants import PlayerField, Role
from ..metrics import DROPPED_GHOST
from ..store.base import Store


@attrs.define(eq=False)
class PlayerHeartbeats:
    """
    Its L{tick} runs every C{heartbeat_interval}, from a timer of the
    stream registry's.

    @ivar streams: returns the worker's live streams.
    """

    log = Logger()

    store: Store
    clock: object
    streams: Callable[[], Iterable]
    heartbeat_interval: float
    ghost_client_timeout: float
    _progress: dict = attrs.field(factory=dict, init=False)
    _beats: dict = attrs.field(factory=dict, init=False)

    async def tick(self) -> None:
        """
        One round of heartbeats and ghost removal, and each stream's idle
        check.
        """
        if not self.store.available:
            # Each call would wait out the store's timeout; the players keep
            # streaming meanwhile, and the first round after Redis is back
            # writes every one of them again.
            return
        now = self.clock.seconds()
        progress = {}
        for stream in list(self.streams()):
            for producer in list(stream.players):
                pid = producer.info.id
                progress[pid] = producer.bytes_sent
                moved = self._progress.get(pid, 0) != producer.bytes_sent
                if moved or not producer.paused:
                    # Written whole, so that a store that lost the player
                    # (Redis restarted empty) has it again.
                    await self.store.add_player(stream.key, pid, stream.players.fields(producer))
                    self._beats[pid] = now
            self._drop_ghosts(stream, now)
            if stream.role is Role.OWNER:
                await stream.players.remove_dead()
                await self._remove_ghosts(stream, now)
            await stream.refresh()
        self._progress = progress
        self._beats = {pid: beat for pid, beat in self._beats.items() if pid in progress}

    def _drop_ghosts(self, stream, now: float) -> None:
        """
        Drop this worker's players whose last heartbeat (the one written
        when they joined, if none since) is too old; leaving, each removes
        its registration from the store.
        """
        oldest = now - self.ghost_client_timeout
        for producer in list(stream.players):
            info = producer.info
            # A beat from before it joined was a previous player's of the
            # same id: an HLS viewer's id is its address and user agent, so
            # one dropped as a ghost that comes back has the id it had.
            if max(self._beats.get(info.id, info.connected_at), info.connected_at) < oldest:
                self._ghost(info.id, stream.key)
                stream.metrics.players_dropped.labels(reason=DROPPED_GHOST).inc()
                producer.abort()

    async def _remove_ghosts(self, stream, now: float) -> None:
        """
        The owner removes the players other workers stopped heartbeating.
        """
        players = await self.store.list_players(stream.key)
        oldest = now - self.ghost_client_timeout
        for pid, fields in players.items():
            if float(fields.get(PlayerField.LAST_HEARTBEAT, 0)) >= oldest:
                continue
            if stream.players.find(pid) is None:
                self._ghost(pid, stream.key)
                await self.store.remove_player(stream.key, pid)

    def _ghost(self, player_id: str, key: str) -> None:
        self.log.warn(
            "player {player} of stream {key} sent no heartbeat for {timeout}s; removing it",
            player=player_id,
            key=key,
            timeout=self.ghost_client_timeout,
        )
