"""
Reading an engine's playback body: the bytes arrive through treq's streaming
body protocol and leave as chunks of whole TS packets.  The reader is
the push producer of the stream's store writer, which pauses it while the
store cannot keep up, so a slow store never grows our memory.
"""

from typing import Callable

import attrs
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface import implementer

from ..stream.mpegts import PacketAligner


@implementer(IPushProducer)
@attrs.define(eq=False)
class EngineReader(Protocol):
    """
    The body protocol of one playback connection.

    @ivar on_chunk: called with each run of whole packets.
    @ivar on_end: called once with L{None} when the engine ended the body
        cleanly, or with the L{Failure} that ended it otherwise.
    @ivar key: the stream, and C{engine} the engine, named in log events.
    @ivar received: counts the bytes read (the worker's metrics), as they
        arrive, so that a scrape sees them grow while the stream plays.
    """

    log = Logger()

    on_chunk: Callable[[bytes], None]
    on_end: Callable[[Failure | None], None]
    aligner: PacketAligner = attrs.field(factory=PacketAligner)
    transport: object = None
    bytes_in: int = 0
    stopped: bool = False
    paused: bool = False
    key: str = ""
    engine: str = ""
    received: object = None

    def makeConnection(self, transport) -> None:
        self.transport = transport
        if self.stopped:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:
            return
        self.bytes_in += len(data)
        if self.received is not None:
            self.received.inc(len(data))
        resyncs = self.aligner.resyncs
        packets = self.aligner.feed(data)
        if self.aligner.resyncs != resyncs:
            self._lost_sync(resyncs)
        if packets:
            self.on_chunk(packets)

    def _lost_sync(self, before: int) -> None:
        """
        The body lost packet alignment (stray bytes between packets) and the
        aligner dropped bytes to regain it.  Said the first time and then
        each time the count passes a power of two: an engine that keeps
        doing it stays visible without a line per batch.
        """
        resyncs = self.aligner.resyncs
        if resyncs.bit_length() == before.bit_length():
            return
        self.log.warn(
            "stream {key}: engine {engine}'s body lost packet sync"
            " ({resyncs} times, {discarded} bytes dropped to regain it)",
            key=self.key,
            engine=self.engine,
            resyncs=resyncs,
            discarded=self.aligner.discarded,
        )

    def connectionLost(self, reason: Failure) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.on_end(None if reason.check(ResponseDone) else reason)

    # IPushProducer: the store writer pauses the engine while it is behind.

    def pauseProducing(self) -> None:
        """
        Stop reading from the engine until L{resumeProducing}.
        """
        if not self.paused and self.transport is not None and not self.stopped:
            self.paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused and not self.stopped:
            self.paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """
        Close the playback connection; L{on_end} is not called.
        """
        if self.stopped:
            return
        self.stopped = True
        if self.transport is not None:
            self.transport.stopProducing()
