"""
One player's end of a stream: an L{IPushProducer} registered on its request,
fed from the stream's L{FanOut}.

A player that keeps up is on the fan-out's live list and gets each chunk the
moment it arrives.  When its socket fills, the transport pauses it; on resume
it reads the window from where it stopped.  If the window has moved past that
point, the player jumps to the newest chunk (a skip) rather than holding
memory for it; a chunk starts on a packet boundary, so the player's bytes stay
aligned either way.
"""

from typing import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .fanout import FanOut
from .sendpath import direct_writer
from .window import Chunk


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
    @ivar position: index of the next chunk to send, or L{None} before the
        first one.
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
    bytes_sent: int = 0
    skips: int = 0
    done: Deferred = attrs.field(init=False)
    _write: Callable[[bytes], None] | None = attrs.field(default=None, init=False)
    _stall: object = attrs.field(default=None, init=False)
    _chunked: bool = attrs.field(default=False, init=False)
    _counted: bool = attrs.field(default=False, init=False)

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
        the live edge.
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
        self._write = direct_writer(request.transport)
        self.fanout.add(self)
        request.registerProducer(self, True)
        self.position = self.fanout.join_position()
        if not self.paused:
            self._catch_up()

    def offer(self, chunk: Chunk) -> None:
        """
        The fan-out's hot path: a new chunk for a player that is caught up.
        """
        self.position = chunk.index + 1
        if self._chunked:
            framed = chunk.framed
            self.bytes_sent += chunk.size
            self._write(framed)
        else:
            self._write_raw(chunk)

    def _catch_up(self) -> None:
        window = self.fanout.window
        while not self.paused and not self.finished:
            position = self.position
            chunk = window.get(position) if position is not None else None
            if chunk is None:
                first = window.first_index
                if position is not None and first is not None and position < first:
                    # Fell out of the window: jump to the newest chunk.
                    self.skips += 1
                    self.position = window.next_index - 1
                    self.log.info(
                        "player {player} of {key} fell behind; skipped to live",
                        player=self.info.id,
                        key=self.info.key,
                    )
                    continue
                self.fanout.go_live(self)
                return
            self.position = position + 1
            if self._chunked:
                self.bytes_sent += chunk.size
                self._write(chunk.framed)
            else:
                self._write_raw(chunk)

    def _write_raw(self, chunk: Chunk) -> None:
        """
        An HTTP/1.0 player takes the bare packets: a copy, on a path that
        players rarely take.
        """
        self.bytes_sent += chunk.size
        self._write(bytes(chunk.data))

    # IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True
        self.fanout.go_idle(self)
        if self.clock is not None and self._stall is None and not self.finished:
            self._stall = self.clock.callLater(self.write_timeout, self._stalled)

    def resumeProducing(self) -> None:
        if self.finished:
            return
        self.paused = False
        self._cancel_stall()
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
        self.fanout.remove(self)
        if self._write is not None:
            self.request.unregisterProducer()
            if self._counted:
                # The access log is written when the request ends; the body
                # bypassed the request's write, which would have counted it.
                self.request.sentLength += self.bytes_sent
        self.on_detach(self)
        return True
