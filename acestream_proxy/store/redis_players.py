"""
The Redis store's players (the seed's C{…:clients} set and a hash per
player) and the time the last one left.
"""

from twisted.internet.defer import Deferred

from . import keys, scripts
from .base import Fields
from .replies import flatten, pairs, text


class PlayerCommands:
    """
    Part of L{RedisStore}: the players of each stream, as every worker
    registers and heartbeats them.
    """

    def add_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        return self._script(
            scripts.ADD_CLIENT,
            [keys.clients(key), keys.client(key, client_id)],
            [
                int(self.ghost_client_timeout * 1000),
                self.stream_ttl_ms,
                client_id,
                *flatten(fields),
            ],
        ).addCallback(lambda _: None)

    def update_player(self, key: str, client_id: str, fields: Fields) -> Deferred[None]:
        return self._script(
            scripts.UPDATE_CLIENT,
            [keys.client(key, client_id)],
            [int(self.ghost_client_timeout * 1000), *flatten(fields)],
        ).addCallback(lambda _: None)

    def remove_player(self, key: str, client_id: str) -> Deferred[int]:
        return self._script(
            scripts.REMOVE_CLIENT, [keys.clients(key), keys.client(key, client_id)], [client_id]
        ).addCallback(int)

    def list_players(self, key: str) -> Deferred[dict[str, dict]]:
        """
        Every member of the clients set; a member whose hash has expired (its
        worker stopped heartbeating it) comes with no fields, and so with no
        heartbeat: a ghost.
        """

        def parse(flat):
            return {text(flat[i]): pairs(flat[i + 1]) for i in range(0, len(flat), 2)}

        return self._script(
            scripts.LIST_CLIENTS, [keys.clients(key)], [keys.client_prefix(key)]
        ).addCallback(parse)

    def count_players(self, key: str) -> Deferred[int]:
        return self._call("SCARD", keys.clients(key)).addCallback(int)

    def set_last_disconnect(self, key: str, when: float | None) -> Deferred[None]:
        name = keys.last_client_disconnect_time(key)
        if when is None:
            d = self._call("DEL", name)
        else:
            d = self._call("SET", name, repr(when), "PX", self.stream_ttl_ms)
        return d.addCallback(lambda _: None)

    def get_last_disconnect(self, key: str) -> Deferred[float | None]:
        return self._call("GET", keys.last_client_disconnect_time(key)).addCallback(
            lambda v: float(v) if v is not None else None
        )
