"""
The owner's path from the engine into the window: each run of packets is
framed once, appended to the store's ring buffer in order, and delivered to
this worker's players under the index the store gave it.

Runs of packets are gathered into chunks of about C{chunk_bytes} first, each
sealed when full or once its first bytes have waited C{chunk_delay}: every
chunk costs a system call per player, so a few large ones are far cheaper
than many small ones, for a bounded wait.

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
from .keyframes import KeyframeScanner
from .window import Chunk

#: Chunks that may wait for the store before the engine's reader is paused.
MAX_PENDING = 8


@implementer(IConsumer)
@attrs.define(eq=False)
class StoreWriter:
    """
    @ivar session: counts the engine sessions the data came from; each
        chunk carries it, so that what follows the stream (HLS) sees where
        one session's bytes end and the next one's begin.
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
    chunk_bytes: int = 0
    chunk_delay: float = 0.1
    producer: object = None
    stopped: bool = False
    session: int = 0
    _held: list = attrs.field(factory=list, init=False)
    _held_bytes: int = attrs.field(default=0, init=False)
    _held_access: list = attrs.field(factory=list, init=False)
    _scanner: KeyframeScanner = attrs.field(factory=KeyframeScanner, init=False)
    _seal_call: object = attrs.field(default=None, init=False)
    # Sealed chunks waiting for the store, each as the arguments of its
    # Chunk after the index: framed, start, added_at, random_access, psi,
    # video, session.
    _pending: deque = attrs.field(factory=deque, init=False)
    _appending: bool = attrs.field(default=False, init=False)

    # IConsumer

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, packets: bytes) -> None:
        """
        Take a run of whole packets, into the chunk being gathered.
        """
        if self.stopped:
            return
        # Random-access points are found as the data arrives, where the
        # packets are whole: joins and skips then start on them.
        base = self._held_bytes
        self._held_access.extend(base + offset for offset in self._scanner.feed(packets))
        self._held.append(packets)
        self._held_bytes += len(packets)
        # The first data of a session is sent at once: the first player
        # waits for it, and the session's start is proved by it.
        if self._held_bytes >= self.chunk_bytes or self.fanout.awaited:
            self._seal()
        elif self._seal_call is None:
            self._seal_call = self.clock.callLater(self.chunk_delay, self._seal)

    def end_session(self) -> None:
        """
        The engine session's body ended: what was gathered of it is sealed
        now, so that no chunk holds two sessions' bytes.
        """
        if self._held and not self.stopped:
            self._seal()

    def new_session(self) -> None:
        """The data that follows comes from a new engine session."""
        self.end_session()
        self.session += 1

    def _seal(self) -> None:
        """
        Close the chunk being gathered: framed once, here, in one copy; the
        store and the fan-out share these bytes.
        """
        self._cancel_seal()
        head = b"%x\r\n" % self._held_bytes
        framed = b"".join([head, *self._held, b"\r\n"])
        self._held.clear()
        self._held_bytes = 0
        access = tuple(self._held_access)
        self._held_access.clear()
        scanner = self._scanner
        self._pending.append(
            (
                framed,
                len(head),
                self.clock.seconds(),
                access,
                scanner.psi,
                scanner.has_video,
                self.session,
            )
        )
        if len(self._pending) > MAX_PENDING and self.producer is not None:
            self.producer.pauseProducing()
        self.flush()

    def _cancel_seal(self) -> None:
        if self._seal_call is not None and self._seal_call.active():
            self._seal_call.cancel()
        self._seal_call = None

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
        framed, start = self._pending[0][:2]
        self._appending = True
        d = self.store.buffer.append(self.key, memoryview(framed)[start:-2])
        d.addCallbacks(self._appended, self._append_failed)

    def stop(self) -> None:
        """
        Forget the chunks waiting for the store; an append under way ends
        without delivering (the buffer tail that follows reads it back).
        """
        self.stopped = True
        self._cancel_seal()
        self._held.clear()
        self._held_access.clear()
        self._pending.clear()
        self.producer = None

    def _stored(self) -> tuple | None:
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
            self.fanout.deliver(Chunk(index, *entry))
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

    def _deliver_local(self, *entry) -> None:
        """
        Give a chunk the store did not number to this worker's players,
        numbered after the last one they got.
        """
        self.fanout.deliver(Chunk(self.fanout.last_index + 1, *entry))
