"""
One stream's HLS in one worker: the owner's cutting, the list of segments
every worker reads from the store, and each segment's bytes put together
from the window (or, for a segment older than this worker's window, from the
store's ring buffer) once, then served to every viewer that asks.

The bytes of the segments asked for are kept, the newest few of them, so
that a segment stays whole for as long as a playlist may list it even if the
window has let its chunks go; they are released when the stream has no HLS
viewer here.
"""

from collections import deque
from typing import Callable

import attrs
from twisted.internet.task import deferLater

from ..background import Tasks
from ..errors import NotFound, Unavailable
from ..store.base import Store
from ..stream.fanout import FanOut
from .cutter import SegmentCutter, longest_segment
from .playlist import render
from .segment import Segment

#: Seconds between looks for a stream's first segment.
POLL = 0.25

#: Seconds after which a viewer waiting for a stream's first segment may ask
#: again.
RETRY_AFTER = 2


@attrs.define(eq=False)
class StreamSegments:
    """
    @ivar watched: whether the stream has HLS viewers in this worker.
    @ivar cutter: the owner's cutter, or L{None} in a follower.
    """

    key: str
    store: Store
    clock: object
    fanout: FanOut
    tasks: Tasks
    target: float
    list_size: int
    watched: Callable[[], bool]
    cutter: SegmentCutter | None = attrs.field(default=None, init=False)
    closed: bool = attrs.field(default=False, init=False)
    _own: deque = attrs.field(init=False)
    _built: dict = attrs.field(factory=dict, init=False)

    @_own.default
    def _own_default(self) -> deque:
        return deque(maxlen=self.kept)

    @property
    def kept(self) -> int:
        """
        How many segments the store describes: those listed, and as many
        that left the list, which players that read it a moment ago may
        still fetch.
        """
        return 2 * self.list_size

    # The owner's cutting

    async def start_cutting(self) -> None:
        """
        This worker owns the stream: cut it, numbering on from the segments
        a previous owner left in the store.
        """
        if self.cutter is not None or self.closed:
            return
        cutter = self.cutter = SegmentCutter(
            self.target, self._cut, room=self.fanout.window.max_seconds
        )
        try:
            previous = await self._stored()
        except Unavailable:
            previous = []
        if self.cutter is not cutter:
            return
        cutter.resume_after(previous[-1] if previous else None)
        self._own.extend(previous)
        self.fanout.observers.append(cutter)

    def stop_cutting(self) -> None:
        if self.cutter in self.fanout.observers:
            self.fanout.observers.remove(self.cutter)
        self.cutter = None
        self._own.clear()

    def _cut(self, segment: Segment) -> None:
        self.fanout.metrics.hls_segments.inc()
        self._own.append(segment)
        self.tasks.run(self.store.segments.add(self.key, segment.encode(), self.kept))
        if not self.watched():
            self._built.clear()
        else:
            # Kept now, while the window surely holds its chunks.
            data = self._from_window(segment)
            if data is not None:
                self._keep(segment.sequence, data)

    def close(self) -> None:
        self.closed = True
        self.stop_cutting()
        self._built.clear()

    # What viewers ask for

    async def playlist(self) -> bytes:
        """
        The live playlist.  While it would list less than three target
        durations (the stream just started), wait for more, as RFC 8216
        asks of a live playlist: players start three target durations from
        its end, and some (browsers' own HLS) fail on a shorter one rather
        than wait.  Past the deadline, what there is is answered.
        """
        deadline = self.clock.seconds() + longest_segment(self.target) + 2 * self.target
        while True:
            listed = await self.listed()
            late = self.clock.seconds() >= deadline
            if listed and (late or self._enough(listed)):
                return render(self.key, listed, self.target)
            if self.closed or late:
                raise Unavailable(
                    f"stream {self.key} has no HLS segment yet", retry_after=RETRY_AFTER
                )
            await deferLater(self.clock, POLL, lambda: None)

    def _enough(self, listed: list[Segment]) -> bool:
        return (
            len(listed) == self.list_size
            or sum(s.duration for s in listed) >= 3 * self.target - 0.001
        )

    async def listed(self) -> list[Segment]:
        """
        The newest C{list_size} segments that can be served, consecutive.
        """
        listed = []
        for segment in reversed(await self._segments()):
            if len(listed) == self.list_size or not self._available(segment):
                break
            if listed and segment.sequence != listed[-1].sequence - 1:
                break
            listed.append(segment)
        return listed[::-1]

    async def segment(self, sequence: int) -> bytes:
        """
        The bytes of segment C{sequence}, or L{NotFound} if there is no
        such segment (any more).
        """
        data = self._built.get(sequence)
        if data is not None:
            return data
        found = next((s for s in await self._segments() if s.sequence == sequence), None)
        if found is None:
            raise NotFound(f"stream {self.key} has no segment {sequence}")
        data = self._from_window(found) or await self._from_store(found)
        if data is None:
            raise NotFound(f"segment {sequence} of stream {self.key} is no longer available")
        self._keep(sequence, data)
        return data

    async def _segments(self) -> list[Segment]:
        if self.cutter is not None:
            return list(self._own)
        return await self._stored()

    async def _stored(self) -> list[Segment]:
        records = await self.store.segments.list(self.key)
        return [s for s in map(Segment.decode, records) if s is not None]

    def _available(self, segment: Segment) -> bool:
        """
        Whether C{segment}'s bytes can still be had: kept here, in this
        worker's window, or in a shared store, whose ring buffer outlasts it.
        """
        return (
            segment.sequence in self._built
            or self.fanout.window.get(segment.start[0]) is not None
            or self.store.shared
        )

    def _from_window(self, segment: Segment) -> bytes | None:
        chunks = self.fanout.window.run(segment.start[0], segment.chunks)
        if len(chunks) != segment.chunks:
            return None
        return segment.cut([chunk.data for chunk in chunks])

    async def _from_store(self, segment: Segment) -> bytes | None:
        first = segment.start[0]
        found = await self.store.buffer.read(self.key, first, segment.chunks)
        if [index for index, _ in found] != list(range(first, first + segment.chunks)):
            return None
        return segment.cut([data for _, data in found])

    def _keep(self, sequence: int, data: bytes) -> None:
        built = self._built
        built[sequence] = data
        while len(built) > self.list_size + 2:
            del built[min(built)]
