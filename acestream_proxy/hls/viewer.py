"""
An HLS viewer: a player that fetches a playlist and its segments, request by
request, instead of holding one response open.

It is counted as one of the stream's players (limits, C{/streams}, metrics,
heartbeats) for as long as it keeps fetching: the worker's heartbeat round
treats it as a paused player, refreshed only while its bytes move, so one
that stops fetching is dropped after C{ghost_client_timeout} like any ghost.
Its requests carry nothing that names it, so a viewer is its address and user
agent on a stream: two players of one household with the same program count
as one.
"""

import hashlib
from contextlib import contextmanager
from typing import Callable

import attrs

from ..stream.player import PlayerInfo


def viewer_id(key: str, address: str, user_agent: str) -> str:
    """
    The player id of the HLS viewer at C{address} with C{user_agent} on
    stream C{key}: the same in every worker, so that a viewer whose requests
    reach several workers is registered once.
    """
    digest = hashlib.sha256(f"{key}\0{address}\0{user_agent}".encode()).hexdigest()
    return f"hls-{digest[:28]}"


@attrs.define(eq=False)
class HlsViewer:
    """
    The player-like side of an HLS viewer, for the stream's L{Players}.

    @ivar on_detach: called once, when the viewer leaves (the stream ended,
        or it stopped fetching).
    """

    info: PlayerInfo
    on_detach: Callable[["HlsViewer"], None]
    bytes_sent: int = 0
    skips: int = 0
    finished: bool = False
    # Its requests being answered now.
    _asking: int = attrs.field(default=0, init=False)

    @property
    def paused(self) -> bool:
        """
        Not written to between its requests: the heartbeat round refreshes
        it only when its bytes moved, or while a request of its waits (for
        a new stream's first segments).
        """
        return not self._asking

    @contextmanager
    def asking(self):
        """While a request of the viewer's is being answered."""
        self._asking += 1
        try:
            yield
        finally:
            self._asking -= 1

    def sent(self, size: int) -> None:
        """It was answered C{size} bytes: proof that it still watches."""
        self.bytes_sent += size

    def finish(self) -> None:
        self._detach()

    def abort(self) -> None:
        self._detach()

    def _detach(self) -> None:
        if not self.finished:
            self.finished = True
            self.on_detach(self)
