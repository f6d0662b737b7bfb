"""
The owner's path from the engine into the window: each run of packets is
framed once, appended to the store's ring buffer in order, and delivered to
this worker's players under the index the store gave it.

The engine reader is this consumer's push producer: while more than
L{MAX_PENDING} chunks wait for the store, the reader is paused, so a slow
store never grows our memory.  One append runs at a time: the store may send
two commands down different connections, and Redis would then number the
chunks in whichever order it read them.
"""

from collections import deque
from typing import Callable

import attrs
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import Unavailable
from ..store.base import Store
from .fanout import FanOut
from .window import Chunk, frame

#: Chunks that may wait for the store before the engine's reader is paused.
MAX_PENDING = 8


@implementer(IConsumer)
@attrs.define(eq=False)
class StoreWriter:
    """
    @ivar may_append: whether the owner lease is surely ours now; while it
        is not (this process stood still past its lease, say), chunks wait
        for L{flush}, called when the lease is renewed, since an append then
        could land after another owner's.
    """

    log = Logger()

    key: str
    store: Store
    clock: object
    fanout: FanOut
    may_append: Callable[[], bool]
    producer: object = None
    stopped: bool = False
    _pending: deque = attrs.field(factory=deque, init=False)
    _appending: bool = attrs.field(default=False, init=False)

    # IConsumer

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, packets: bytes) -> None:
        """
        Take a run of whole packets: framed once, here; the store and the
        fan-out share these bytes.
        """
        framed, start = frame(packets)
        self._pending.append((framed, start, self.clock.seconds()))
        if len(self._pending) > MAX_PENDING and self.producer is not None:
            self.producer.pauseProducing()
        self.flush()

    def flush(self) -> None:
        """
        Append the oldest chunk not yet stored.  While the store is down the
        chunks go to this worker's players at once, numbered locally, rather
        than wait for a timeout.
        """
        if self._appending or not self._pending or self.stopped:
            return
        if not self.store.available:
            while self._pending:
                self._deliver_local(*self._pending.popleft())
            self._resume_producer()
            return
        if not self.may_append():
            return
        framed, start, _ = self._pending[0]
        self._appending = True
        d = self.store.buffer.append(self.key, memoryview(framed)[start:-2])
        d.addCallbacks(self._appended, self._append_failed)

    def stop(self) -> None:
        """
        Forget the chunks waiting for the store; an append under way ends
        without delivering (the buffer tail that follows reads it back).
        """
        self.stopped = True
        self._pending.clear()
        self.producer = None

    def _stored(self) -> tuple[bytes, int, float] | None:
        self._appending = False
        if self.stopped:
            return None
        entry = self._pending.popleft()
        self._resume_producer()
        return entry

    def _resume_producer(self) -> None:
        if len(self._pending) <= MAX_PENDING // 2 and self.producer is not None:
            self.producer.resumeProducing()

    def _appended(self, index: int) -> None:
        entry = self._stored()
        if entry is not None:
            framed, start, now = entry
            self.fanout.deliver(Chunk(index, framed, start, now))
            self.flush()

    def _append_failed(self, failure: Failure) -> None:
        """
        The store could not take the chunk (Redis went down): this worker's
        players still get it.
        """
        entry = self._stored()
        if not failure.check(Unavailable):
            self.log.failure("stream {key}: could not store a chunk", failure, key=self.key)
        if entry is not None:
            self._deliver_local(*entry)
            self.flush()

    def _deliver_local(self, framed: bytes, start: int, now: float) -> None:
        """
        Give a chunk the store did not number to this worker's players,
        numbered after the last one they got.
        """
        self.fanout.deliver(Chunk(self.fanout.last_index + 1, framed, start, now))
