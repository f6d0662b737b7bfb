"""
The fan-out of one stream inside one worker: every new chunk enters the local
window once and is handed, as the same bytes object, to each player that is
keeping up.  Players that are paused or behind read from the window at their
own pace (see L{acestream_proxy.stream.player}).

The loop over live players is the daemon's hottest code: per chunk and
player it makes one call, to the player's send function, and nothing else.
What a live player has been sent is worked out when it leaves the live set,
from the fan-out's running totals, instead of being counted per chunk; the
worker's sent-bytes metric takes one addition per chunk for all live
players together.
"""

from typing import Callable

import attrs
from twisted.internet.defer import Deferred

from ..metrics import Metrics
from .window import Chunk, ChunkWindow


@attrs.define(eq=False)
class FanOut:
    """
    @ivar window: the chunks players may still read.
    @ivar join_chunks: how far behind the live edge a new player starts, so
        that its player's own buffer fills at once.
    @ivar last_index: the index of the last chunk delivered (0 before the
        first).
    @ivar delivered_bytes: the bytes of packets of every chunk delivered so
        far: a live player's count of bytes sent is this total less what it
        was when the player went live.
    @ivar metrics: the worker's metrics, where sent bytes and skips count.
    """

    window: ChunkWindow
    join_chunks: int
    last_index: int = 0
    delivered_bytes: int = 0
    metrics: Metrics = attrs.field(factory=Metrics)
    producers: set = attrs.field(factory=set, init=False)
    #: Called with each chunk delivered, once per chunk (not per player):
    #: what cuts HLS segments follows the stream this way.
    observers: list = attrs.field(factory=list, init=False)
    # Live players, by how they take a chunk: framed for HTTP/1.1 chunked
    # transfer (nearly all), or as bare packets (HTTP/1.0).
    _framed: dict = attrs.field(factory=dict, init=False)
    _bare: dict = attrs.field(factory=dict, init=False)
    _waiting: list = attrs.field(factory=list, init=False)
    # New players that wait for a chunk to start at, each with what it is
    # told of every chunk delivered until it says it started.
    _starting: dict = attrs.field(factory=dict, init=False)

    def deliver(self, chunk: Chunk) -> None:
        """
        Add the newest chunk and send it to every player that is caught up.
        A player whose socket fills up during its send leaves the live set
        at once, so the loops walk copies.
        """
        self.last_index = chunk.index
        self.delivered_bytes += chunk.size
        self.window.append(chunk)
        framed = chunk.framed
        live = list(self._framed.values())
        # The players live now get the chunk: counted for all of them at once.
        if receivers := len(live) + len(self._bare):
            self.metrics.sent_bytes.inc(chunk.size * receivers)
        for send in live:
            send(framed)
        if self._bare:
            data = bytes(chunk.data)
            for send in list(self._bare.values()):
                send(data)
        for observe in self.observers:
            observe(chunk)
        if self._starting:
            for producer, take in list(self._starting.items()):
                if take(chunk):
                    self._starting.pop(producer, None)
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(chunk)

    def next_chunk(self) -> Deferred:
        """
        Fire with the next chunk delivered: how a data source learns that
        its first data reached the players.  Cancelling it forgets it.
        """
        d = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        return d

    @property
    def awaited(self) -> bool:
        """
        Whether a data source waits for the next chunk (its first data).
        """
        return bool(self._waiting)

    def join_position(self) -> int | None:
        """
        The index a new player starts from, or L{None} to start with the next
        chunk when the window is empty.
        """
        window = self.window
        if not len(window):
            return None
        return max(window.first_index, window.next_index - self.join_chunks)

    def await_start(self, producer, take: Callable[[Chunk], bool]) -> None:
        """
        Tell C{producer}'s C{take} of each new chunk, once it is in the
        window and the live players have it, until C{take} returns true:
        how a new player waits for a place to start (see
        L{acestream_proxy.stream.player}).
        """
        self._starting[producer] = take

    def add(self, producer) -> None:
        self.producers.add(producer)

    def remove(self, producer) -> None:
        self.producers.discard(producer)
        self._starting.pop(producer, None)
        self.go_idle(producer)

    def go_live(self, producer, send: Callable[[bytes], None], framed: bool) -> None:
        """
        C{producer} has sent everything in the window: from now on, C{send}
        each new chunk to it, C{framed} or as bare packets.
        """
        (self._framed if framed else self._bare)[producer] = send

    def go_idle(self, producer) -> bool:
        """
        C{producer} is paused or finished: stop sending it chunks.  Whether
        it was live.
        """
        return (
            self._framed.pop(producer, None) is not None
            or self._bare.pop(producer, None) is not None
        )

    def is_live(self, producer) -> bool:
        return producer in self._framed or producer in self._bare

    @property
    def live_count(self) -> int:
        return len(self._framed) + len(self._bare)
