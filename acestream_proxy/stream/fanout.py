"""
The fan-out of one stream inside one worker: every new chunk enters the local
window once and is handed, as the same bytes object, to each player that is
keeping up.  Players that are paused or behind read from the window at their
own pace (see L{acestream_proxy.producer}).
"""

import attrs
from twisted.internet.defer import Deferred

from .window import Chunk, ChunkWindow


@attrs.define(eq=False)
class FanOut:
    """
    @ivar window: the chunks players may still read.
    @ivar join_chunks: how far behind the live edge a new player starts, so
        that its player's own buffer fills at once.
    """

    window: ChunkWindow
    join_chunks: int
    #: The index of the last chunk delivered (0 before the first).
    last_index: int = 0
    _live: list = attrs.field(factory=list, init=False)
    producers: set = attrs.field(factory=set, init=False)
    _waiting: list = attrs.field(factory=list, init=False)

    def deliver(self, chunk: Chunk) -> None:
        """
        Add the newest chunk and give it to every player that is caught up.
        A player whose transport fills up during its write leaves the live
        list by itself, so the loop walks a copy.
        """
        self.last_index = chunk.index
        self.window.append(chunk)
        for producer in self._live[:]:
            producer.offer(chunk)
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

    def join_position(self) -> int | None:
        """
        The index a new player starts from, or L{None} to start with the next
        chunk when the window is empty.
        """
        window = self.window
        if not len(window):
            return None
        return max(window.first_index, window.next_index - self.join_chunks)

    def add(self, producer) -> None:
        self.producers.add(producer)

    def remove(self, producer) -> None:
        self.producers.discard(producer)
        self.go_idle(producer)

    def go_live(self, producer) -> None:
        """
        C{producer} has sent everything in the window: give it new chunks as
        they arrive.
        """
        if producer not in self._live:
            self._live.append(producer)

    def go_idle(self, producer) -> None:
        """
        C{producer} is paused or finished: stop handing it chunks.
        """
        try:
            self._live.remove(producer)
        except ValueError:
            pass

    @property
    def live_count(self) -> int:
        return len(self._live)
