"""
A stream's players in this worker: each a L{PlayerProducer} on the stream's
fan-out, or an L{HlsViewer} fetching its segments, registered in the store
(so that every worker counts it and the heartbeats keep it) and announced on
the stream's event channel.
"""

from typing import Callable

import attrs
from twisted.logger import Logger

from ..background import Tasks
from ..config import Tuning
from ..constants import Event, PlayerField
from ..hls.viewer import HlsViewer
from ..store.base import Store
from .fanout import FanOut
from .player import PlayerInfo, PlayerProducer


@attrs.define(eq=False)
class Players:
    """
    @ivar left: called with a player's id and how many players the stream
        has left in every worker, once the store counted its departure.
    """

    log = Logger()

    key: str
    store: Store
    clock: object
    tuning: Tuning
    worker_id: str
    fanout: FanOut
    tasks: Tasks
    left: Callable[[str, int], None]
    producers: set = attrs.field(factory=set, init=False)
    #: The HLS viewers among the players, by id.
    viewers: dict = attrs.field(factory=dict, init=False)

    def __len__(self) -> int:
        return len(self.producers)

    def __iter__(self):
        return iter(list(self.producers))

    def add(self, info: PlayerInfo, request) -> PlayerProducer:
        """
        Attach a player and start streaming to it.
        """
        producer = PlayerProducer(
            info,
            self.fanout,
            request,
            self._gone,
            clock=self.clock,
            write_timeout=self.tuning.write_timeout,
        )
        self._register(producer)
        producer.start()
        return producer

    def add_viewer(self, info: PlayerInfo) -> HlsViewer:
        """
        Count an HLS viewer as a player, until it stops fetching.
        """
        viewer = HlsViewer(info, self._gone)
        self.viewers[info.id] = viewer
        self._register(viewer)
        return viewer

    def _register(self, player: PlayerProducer | HlsViewer) -> None:
        info = player.info
        self.producers.add(player)
        self.fanout.metrics.players.inc()
        self.tasks.run(self.store.add_player(self.key, info.id, self.fields(player)))
        self.publish(Event.PLAYER_CONNECTED, client_id=info.id)
        self.log.info(
            "player {player} ({address}) joined stream {key}",
            player=info.id,
            address=info.address,
            key=self.key,
        )

    def fields(self, producer: PlayerProducer) -> dict:
        """
        What the store keeps of a player, its heartbeat now.
        """
        info = producer.info
        return {
            PlayerField.ID: info.id,
            PlayerField.WORKER: self.worker_id,
            PlayerField.ADDRESS: info.address,
            PlayerField.USER_AGENT: info.user_agent,
            PlayerField.CONNECTED_AT: info.connected_at,
            PlayerField.LAST_HEARTBEAT: self.clock.seconds(),
            PlayerField.BYTES_SENT: producer.bytes_sent,
            PlayerField.SKIPS: producer.skips,
        }

    def find(self, player_id: str) -> PlayerProducer | None:
        for producer in self.producers:
            if producer.info.id == player_id:
                return producer
        return None

    def finish_all(self) -> None:
        """
        The stream ended: every player gets a clean end of body.
        """
        for producer in list(self.producers):
            producer.finish()

    async def restore(self) -> None:
        """
        Register every player here again (Redis lost them).
        """
        for producer in list(self.producers):
            await self.store.add_player(self.key, producer.info.id, self.fields(producer))

    async def remove_dead(self) -> None:
        """
        Remove the players other workers registered, whose workers are
        known dead: they cannot be playing, and until removed they would
        keep the stream (and its engine session) going.
        """
        players = await self.store.list_players(self.key)
        alive = {self.worker_id: True}
        for player_id, fields in players.items():
            worker = fields.get(PlayerField.WORKER)
            if worker is None:
                continue
            if worker not in alive:
                alive[worker] = await self.store.is_alive(worker)
            if not alive[worker]:
                self.log.info(
                    "player {player} of stream {key} was on worker {worker}, which is gone;"
                    " removing it",
                    player=player_id,
                    key=self.key,
                    worker=worker,
                )
                await self._unregister(player_id)

    def publish(self, event: Event, **fields) -> None:
        """
        Tell every worker about C{event} on the stream's channel, without
        waiting.
        """
        self.tasks.run(self.store.publish(self.key, event.value, **fields))

    def _gone(self, producer: PlayerProducer | HlsViewer) -> None:
        self.producers.discard(producer)
        self.viewers.pop(producer.info.id, None)
        self.fanout.metrics.players.dec()
        self.log.info(
            "player {player} left stream {key} after {bytes} bytes",
            player=producer.info.id,
            key=self.key,
            bytes=producer.bytes_sent,
        )
        if isinstance(producer, HlsViewer):
            self.tasks.run(self._unregister_viewer(producer.info.id))
        else:
            self.tasks.run(self._unregister(producer.info.id))

    async def _unregister(self, player_id: str) -> None:
        remaining = await self.store.remove_player(self.key, player_id)
        self.left(player_id, remaining)

    async def _unregister_viewer(self, player_id: str) -> None:
        """
        An HLS viewer left this worker.  Its requests may go to several
        workers (a load balancer without stickiness), each with its copy of
        the viewer under the same id: the copy another worker heartbeated
        last still watches, and keeps the registration.
        """
        stored = (await self.store.list_players(self.key)).get(player_id)
        if stored is not None and stored.get(PlayerField.WORKER, self.worker_id) != self.worker_id:
            return
        await self._unregister(player_id)
