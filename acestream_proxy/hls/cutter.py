"""
The owner's cutting of its stream into HLS segments, as chunks are delivered.

A segment starts on a random-access point of the video with the PAT and PMT
in front, so that a player may begin with any of them, and ends where the
first such point at least C{target} seconds later starts the next.  Its
duration is told by the video's presentation time stamps where the point's
packet carries one, else by when the chunks arrived.

Where the time stamps jump (a new engine session, or a splice in the
broadcast), the segment under way ends at the next keyframe and the next
one is marked as a discontinuity.

A stream with no video keyframes (radio, the synthetic test stream) is cut at
chunk boundaries instead, once a little wait shows that none come; a stream
whose keyframes stop for too long gets one such cut too, so that a segment
never grows without bound.
"""

import math
from typing import Callable

import attrs

from ..stream.mpegts import PACKET_SIZE, pes_pts
from ..stream.window import Chunk
from .segment import Segment

#: PTS wrap-around, and their clock rate.
_PTS_MODULO = 1 << 33
_PTS_RATE = 90_000.0

#: The longest believable gap between two keyframes' time stamps, in
#: seconds: a larger one is a jump in the stamps, not a duration.
_LONGEST_GAP = 60.0


def longest_segment(target: float) -> float:
    """
    The longest a keyframed stream's segment may grow before it is cut where
    no keyframe is: long enough for any usual keyframe interval.
    """
    return max(4 * target, 10.0)


@attrs.frozen
class _Point:
    """Where a segment may start: chunk index, offset, and its times."""

    index: int
    offset: int
    pts: int | None
    at: float
    psi: bytes
    discontinuity: int = 0
    discontinuous: bool = False


@attrs.define(eq=False)
class SegmentCutter:
    """
    Observes the owner's fan-out (see L{FanOut.observers}) and calls
    C{publish} with each segment it completes.

    @ivar target: the shortest segment cut at a keyframe, in seconds.
    @ivar sequence: the next segment's sequence number.
    @ivar discontinuity: the discontinuity sequence number of the segments
        being cut now: how many engine-session changes came before them.
    @ivar room: the seconds of chunks the window holds, if it bounds them:
        a segment longer than that could not be put together from it.
    """

    target: float
    publish: Callable[[Segment], None]
    sequence: int = 0
    discontinuity: int = 0
    room: float = math.inf
    _start: _Point | None = attrs.field(default=None, init=False)
    _first_at: float | None = attrs.field(default=None, init=False)
    _psi: bytes = attrs.field(default=b"", init=False)
    _keyframes: bool = attrs.field(default=False, init=False)
    # The time stamp of the last keyframe seen, to notice a jump.
    _last_pts: int | None = attrs.field(default=None, init=False)
    # The next segment begins a new engine session.
    _session_changed: bool = attrs.field(default=False, init=False)

    @property
    def longest(self) -> float:
        """
        The longest segment cut where no keyframe is: at most what the
        window holds, less a second for the chunk that ends it coming late,
        or the segment's first chunks would have left it by then.
        """
        return min(longest_segment(self.target), max(self.target, self.room - 1))

    def resume_after(self, last: Segment | None) -> None:
        """
        Continue the numbering of the segments a previous owner cut (C{last}
        the newest of them): what is cut here comes from another session.
        """
        if last is not None:
            self.sequence = last.sequence + 1
            self.discontinuity = last.discontinuity
            self._session_changed = True

    def new_session(self) -> None:
        """
        The engine session changed: the segment under way ends at the next
        point, and the one after is marked as a discontinuity.
        """
        if self._start is not None or self.sequence:
            self._session_changed = True

    def __call__(self, chunk: Chunk) -> None:
        at = chunk.added_at
        if self._first_at is None:
            self._first_at = at
        if chunk.psi:
            self._psi = chunk.psi
        if chunk.random_access:
            self._keyframes = True
            data = chunk.data
            for offset in chunk.random_access:
                pts = pes_pts(data[offset : offset + PACKET_SIZE])
                jumped = self._jumped(pts)
                self._point(_Point(chunk.index, offset, pts, at, self._psi), jumped=jumped)
        elif self._keyframes:
            if self._start is not None and at - self._start.at >= self.longest:
                self._point(_Point(chunk.index, 0, None, at, self._psi), force=True)
        elif self._start is not None or at - self._first_at >= 2 * self.target:
            self._point(_Point(chunk.index, 0, None, at, self._psi))

    def _jumped(self, pts: int | None) -> bool:
        """
        Whether the time stamps jumped (went back, or far ahead) since the
        last keyframe: a splice in the broadcast, which players must be told
        of as a discontinuity, as they are of a new engine session.
        """
        last, self._last_pts = self._last_pts, pts
        if last is None or pts is None:
            return False
        return not 0 <= ((pts - last) % _PTS_MODULO) / _PTS_RATE <= _LONGEST_GAP

    def _point(self, point: _Point, force: bool = False, jumped: bool = False) -> None:
        start = self._start
        changed = self._session_changed or jumped
        if start is not None:
            duration = self._duration(start, point, changed)
            if duration < self.target and not (force or changed):
                return
            self.publish(
                Segment(
                    self.sequence,
                    (start.index, start.offset),
                    (point.index, point.offset),
                    duration,
                    start.discontinuity,
                    start.discontinuous,
                    start.psi,
                )
            )
            self.sequence += 1
        if changed:
            self._session_changed = False
            self.discontinuity += 1
        self._start = attrs.evolve(point, discontinuity=self.discontinuity, discontinuous=changed)

    def _duration(self, start: _Point, end: _Point, changed: bool) -> float:
        """
        Seconds from C{start} to C{end}: by their time stamps when both have
        one and the session did not change between them, else by arrival.
        """
        if start.pts is not None and end.pts is not None and not changed:
            seconds = ((end.pts - start.pts) % _PTS_MODULO) / _PTS_RATE
            if 0 < seconds <= _LONGEST_GAP:
                return seconds
        return max(0.0, end.at - start.at)
