"""
One player's end of a stream: an L{IPushProducer} registered on its request,
fed from the stream's L{FanOut}.

A player that keeps up is on the fan-out's live list and gets each chunk the
moment it arrives.  When its socket fills, the transport pauses it; on resume
it reads the window from where it stopped.  If the window has moved past that
point, the player jumps to the newest chunk (a skip) rather than holding
memory for it; a chunk starts on a packet boundary, so the player's bytes stay
aligned either way.

Where the window knows the video's random-access points, a joining player
and one that skips start on the newest suitable one instead, with the PAT and
PMT in front, so that their first frame decodes; that first piece is the only
one built for one player.

A player that finds no such point in the window (the first player of a new
stream, whose engine starts sending anywhere in a group of pictures) waits
for the first one to arrive rather than begin with pictures it cannot
decode.  It waits only while that can help: a stream known to have no video
(radio, the synthetic test stream) starts it at once, packet-aligned as
before; a video stream in which no point turned up for as long as the
window keeps (L{start_wait}) starts it packet-aligned too.
"""

from typing import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ..metrics import DROPPED_WRITE_TIMEOUT
from .fanout import FanOut
from .sendpath import writers
from .window import Chunk, ChunkWindow, frame

#: The most chunks a player that is behind is sent in one system call.
CATCH_UP_BATCH = 16


def start_wait(window: ChunkWindow) -> float:
    """
    The most stream time (by the chunks' C{added_at}) a new player waits
    for a random-access point: the span of stream the window keeps
    (C{tuning.buffer_seconds}, or its time to live if shorter).  A point
    would be in the window if the stream had one that often; and the bytes
    the player would otherwise have started with are still there to send.
    """
    return min(window.max_seconds, window.ttl)


@attrs.frozen
class PlayerInfo:
    """
    Who a player is; fixed for its connection's life.
    """

    id: str
    key: str
    address: str
    user_agent: str
    connected_at: float


@implementer(IPushProducer)
@attrs.define(eq=False)
class PlayerProducer:
    """
    @ivar done: fires when the player's response should end: with L{None}
        when the stream ended, after the final chunk.  Cancelling it (the web
        layer does that when the connection is lost) detaches the player.
    @ivar position: index of the next chunk to send from the window, or
        L{None} before the first one; while the player is live it is not
        kept up to date (the next chunk delivered is the next one sent).
    """

    log = Logger()

    info: PlayerInfo
    fanout: FanOut
    request: object
    on_detach: Callable[["PlayerProducer"], None]
    clock: object = None
    write_timeout: float | None = None
    position: int | None = None
    paused: bool = False
    finished: bool = False
    skips: int = 0
    done: Deferred = attrs.field(init=False)
    _sent: int = attrs.field(default=0, init=False)
    # The fan-out's delivered_bytes when this player went live; None while
    # it is not live.
    _live_mark: int | None = attrs.field(default=None, init=False)
    _write: Callable[[bytes], None] | None = attrs.field(default=None, init=False)
    _write_many: Callable[[list], int] | None = attrs.field(default=None, init=False)
    _stall: object = attrs.field(default=None, init=False)
    _chunked: bool = attrs.field(default=False, init=False)
    _counted: bool = attrs.field(default=False, init=False)
    # Whether it waits for a random-access point to start at, and since
    # when: the added_at of the oldest chunk it could have started with.
    _waiting: bool = attrs.field(default=False, init=False)
    _waiting_since: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.done = Deferred(self._cancelled)

    def _cancelled(self, done: Deferred) -> None:
        """
        C{done} was cancelled (the player's connection is gone): detach.
        """
        self._detach()

    def start(self) -> None:
        """
        Send the response headers and begin streaming from a few chunks behind
        the live edge: from a random-access point there, or failing one in
        the window, from the first to arrive (see the module docstring).
        """
        request = self.request
        request.write(b"")
        self._chunked = bool(request.chunked)
        # twisted.web's request counts its body bytes for the access log;
        # ours bypass its write, so they are added to that count at the end.
        self._counted = hasattr(request, "sentLength")
        # Chunks are sent pre-framed straight to the transport: the same bytes
        # object for every player, no per-player framing.  The writer pauses
        # this producer as soon as the kernel does not take a whole chunk: a
        # stuck player then holds at most the rest of one chunk in our
        # memory, and catches up from the shared window when its socket
        # drains (see sendpath.pausing_writer).
        self._write, write_many = writers(request.transport)
        if self._chunked:
            # The batches are of framed chunks: HTTP/1.0 players take bare ones.
            self._write_many = write_many
        self.fanout.add(self)
        request.registerProducer(self, True)
        fanout = self.fanout
        if not (
            self._start_at_random_access(fanout.join_chunks)
            or self._start_at_random_access(1)
        ):
            self.position = fanout.join_position()
            if self._may_wait():
                window = fanout.window
                self._waiting = True
                if len(window):
                    self._waiting_since = window.get(window.first_index).added_at
                fanout.await_start(self, self._start_with)
                return
        if not self.paused:
            self._catch_up()

    def _may_wait(self) -> bool:
        """
        Whether waiting for a random-access point may yet give this new
        player a clean start: the window has none, and the stream may have
        video whose points have not had the time to show.
        """
        window = self.fanout.window
        if not len(window):
            return True  # nothing known yet: the first chunk tells
        newest = window.get(window.next_index - 1)
        if newest.video is False:
            return False
        oldest = window.get(window.first_index)
        return newest.added_at - oldest.added_at < start_wait(window)

    def _start_with(self, chunk: Chunk) -> bool:
        """
        A chunk arrived while this player waits for a place to start: start
        at its first random-access point, or packet-aligned if the stream
        turned out to have no video or kept none for L{start_wait}.

        @return: whether the player started (and waits no more).
        """
        if self._waiting_since is None:
            self._waiting_since = chunk.added_at
        if self.position is None:
            self.position = chunk.index
        if chunk.random_access and chunk.psi:
            self._send_from(chunk, chunk.random_access[0])
        elif (
            chunk.video is False
            or chunk.added_at - self._waiting_since >= start_wait(self.fanout.window)
        ):
            # Where it would have started, unless the window moved past it
            # (or the stream's numbering began again).
            self.position = min(max(self.position, self.fanout.join_position()), chunk.index)
            if self.position == chunk.index:
                # This chunk alone: sent as it would have been had the
                # player been live.
                self._write(chunk.framed if self._chunked else bytes(chunk.data))
                self.position += 1
                self._sent += chunk.size
                self.fanout.metrics.sent_bytes.inc(chunk.size)
        else:
            return False
        self._waiting = False
        self._waiting_since = None
        if not self.paused:
            self._catch_up()
        return True

    @property
    def bytes_sent(self) -> int:
        """
        The bytes of packets handed to this player's connection so far.
        """
        if self._live_mark is None:
            return self._sent
        return self._sent + self.fanout.delivered_bytes - self._live_mark

    def _catch_up(self) -> None:
        """
        Send what the window holds from this player's position on, then go
        live.  Several chunks go down in one system call when the socket
        takes them: a player that is behind catches up at the cost of few
        calls rather than one per chunk.
        """
        window = self.fanout.window
        while not self.paused and not self.finished:
            position = self.position
            chunks = window.run(position, CATCH_UP_BATCH) if position is not None else ()
            if not chunks:
                first = window.first_index
                if position is not None and first is not None and position < first:
                    # Fell out of the window: jump to the newest chunk.
                    self.skips += 1
                    self.fanout.metrics.player_skips.inc()
                    if not self._start_at_random_access(1):
                        self.position = window.next_index - 1
                    self.log.info(
                        "player {player} of {key} fell behind; skipped to live",
                        player=self.info.id,
                        key=self.info.key,
                    )
                    continue
                self._go_live()
                return
            if self._write_many is not None:
                chunks = chunks[: self._write_many([chunk.framed for chunk in chunks])]
            else:
                chunks = chunks[:1]
                chunk = chunks[0]
                self._write(chunk.framed if self._chunked else bytes(chunk.data))
            self.position = chunks[-1].index + 1
            sent = sum(chunk.size for chunk in chunks)
            self._sent += sent
            self.fanout.metrics.sent_bytes.inc(sent)

    def _start_at_random_access(self, behind: int) -> bool:
        """
        Send the PAT, the PMT and the rest of the chunk from its newest
        random-access point at least C{behind} chunks from the live edge,
        and carry on after that chunk: the player's decoder then starts on a
        keyframe rather than on frames it cannot decode.  This copy is made
        once per join or skip, never per chunk.

        @return: whether there was such a point; when not, the caller's
            packet-aligned position stands.
        """
        point = self.fanout.window.random_access_point(behind)
        if point is None:
            return False
        self._send_from(*point)
        return True

    def _send_from(self, chunk: Chunk, offset: int) -> None:
        """
        Send the PAT and PMT, then C{chunk} from C{offset} on; carry on
        after it.
        """
        data = chunk.psi + bytes(chunk.data[offset:])
        self.position = chunk.index + 1
        self._sent += len(data)
        self.fanout.metrics.sent_bytes.inc(len(data))
        self._write(frame(data)[0] if self._chunked else data)

    def _go_live(self) -> None:
        """
        Everything in the window is sent: take each new chunk as it comes.
        """
        self._live_mark = self.fanout.delivered_bytes
        self.fanout.go_live(self, self._write, self._chunked)

    def _leave_live(self) -> None:
        """
        Stop taking new chunks, and settle what was sent while live: every
        chunk delivered since going live, up to the newest.
        """
        if self.fanout.go_idle(self):
            self._sent += self.fanout.delivered_bytes - self._live_mark
            self.position = self.fanout.last_index + 1
        self._live_mark = None

    # IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True
        self._leave_live()
        if self.clock is not None and self._stall is None and not self.finished:
            self._stall = self.clock.callLater(self.write_timeout, self._stalled)

    def resumeProducing(self) -> None:
        if self.finished:
            return
        self.paused = False
        self._cancel_stall()
        if not self._waiting:
            self._catch_up()

    def _stalled(self) -> None:
        """
        The player's socket stayed full for C{write_timeout}: drop it, and
        with it whatever its connection still buffers.
        """
        self._stall = None
        self.log.warn(
            "player {player} of {key} read nothing for {timeout}s; disconnecting it",
            player=self.info.id,
            key=self.info.key,
            timeout=self.write_timeout,
        )
        self.fanout.metrics.players_dropped.labels(reason=DROPPED_WRITE_TIMEOUT).inc()
        self.abort()

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def stopProducing(self) -> None:
        self._detach()

    # Ending

    def finish(self) -> None:
        """
        The stream ended: end this player's response cleanly.
        """
        if self._detach():
            self.done.callback(None)

    def abort(self) -> None:
        """
        Drop the player's connection (a ghost, or a player that stopped
        reading).
        """
        transport = getattr(self.request, "transport", None)
        if self._detach() and transport is not None:
            transport.abortConnection()

    def _detach(self) -> bool:
        """
        Leave the fan-out and release the request; true the first time.
        """
        if self.finished:
            return False
        self.finished = True
        self._cancel_stall()
        self._leave_live()
        self.fanout.remove(self)
        if self._write is not None:
            self.request.unregisterProducer()
            if self._counted:
                # The access log is written when the request ends; the body
                # bypassed the request's write, which would have counted it.
                self.request.sentLength += self.bytes_sent
        self.on_detach(self)
        return True
