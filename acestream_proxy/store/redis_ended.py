"""
Streams that ended while Redis could not be reached: their keys are
deleted once it is back, unless another worker or session took them.
"""

import json

from twisted.internet.defer import Deferred

from ..constants import Event
from . import keys, scripts
from .connection import reason


class EndedStreams:
    """
    Part of L{RedisStore}: what it must put right in Redis once it serves
    again.
    """

    def forget_stream_when_back(self, key: str, session_id: str | None) -> None:
        """
        The stream ended while Redis could not be reached: delete its keys
        (and tell the other workers it stopped) once Redis is back, unless
        another worker took it, or another session of it began, meanwhile.
        Keys that outlive the store's stopping, or the keys' own time to
        live, expire.
        """
        self._ended[key] = (session_id or "", self.reactor.seconds())
        if self.available:
            self._back()

    def _back(self) -> None:
        """
        Redis serves again: delete the keys of the streams that ended
        meanwhile; a failure leaves them for the next time.
        """
        now = self.reactor.seconds()
        for key, ended in list(self._ended.items()):
            if now - ended[1] > self.stream_ttl_ms / 1000:
                # Expired by now.
                del self._ended[key]
            else:
                self._forget(key, ended)

    def _forget(self, key: str, ended: tuple) -> None:
        def done(_):
            if self._ended.get(key) == ended:
                del self._ended[key]

        def failed(failure):
            self.log.warn(
                "stream {key}: could not delete its keys: {why}", key=key, why=reason(failure)
            )

        self._delete_ended(key, ended[0]).addCallbacks(done, failed)

    def _delete_ended(self, key: str, session_id: str) -> Deferred[bool]:
        message = json.dumps(
            {
                "event": Event.STREAM_STOPPING.value,
                "worker_id": self.worker_id,
                "ts": self.reactor.seconds(),
            }
        )
        return self._script(
            scripts.DELETE_ENDED,
            [
                keys.buffer_index(key),
                keys.owner(key),
                keys.metadata(key),
                keys.clients(key),
                keys.last_client_disconnect_time(key),
                keys.events(key),
            ],
            [
                keys.buffer_chunk_prefix(key),
                self.buffer_chunks,
                keys.client_prefix(key),
                self.worker_id,
                session_id,
                message,
            ],
        ).addCallback(lambda reply: int(reply) == 1)
