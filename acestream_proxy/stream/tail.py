"""
The data source of a worker that does not own the stream: it follows the
store's ring buffer, reading each new chunk once (woken by C{chunk_added},
with a short poll as a safety net) and handing it to this worker's fan-out.
"""

from typing import Callable

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from ..background import Tasks, periodic
from ..constants import StreamState
from ..errors import EngineTimeout, Unavailable
from ..store.base import Store
from .fanout import FanOut
from .keyframes import KeyframeScanner
from .watched import watched
from .window import Chunk

#: Seconds between safety polls of the ring buffer.
POLL = 0.5

#: Most chunks read in one round trip.
READ_BATCH = 50


@attrs.define(eq=False)
class BufferTail(MultiService):
    """
    @ivar next_index: the index of the next chunk to read, or L{None} until
        the buffer has one.
    @ivar on_change: told when C{state} is about to change.
    """

    log = Logger()

    key: str
    store: Store
    clock: object
    fanout: FanOut
    tasks: Tasks
    join_chunks: int
    first_byte_timeout: float
    next_index: int | None = None
    state: StreamState = watched(StreamState.STARTING)
    on_change: Callable[[object, str, object], None] | None = None
    last_data_at: float | None = None
    _reading: bool = attrs.field(default=False, init=False)
    _read_again: bool = attrs.field(default=False, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    # Chunks read back from the store carry no random-access points; they
    # are found here again, so that this worker's joins start on them too.
    _scanner: KeyframeScanner = attrs.field(factory=KeyframeScanner, init=False)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        periodic(POLL, self.read_new, self.clock, self.tasks).setServiceParent(self)

    async def open(self) -> None:
        """
        Start a few chunks behind the buffer's newest; fire once the first
        chunk reached the players.
        """
        first = self.fanout.next_chunk()
        latest = await self.store.buffer.latest(self.key)
        if latest and self.next_index is None:
            self.next_index = max(1, latest - self.join_chunks + 1)
        await self.read_new()
        try:
            await first.addTimeout(self.first_byte_timeout, self.clock)
        except TimeoutError:
            raise EngineTimeout(f"stream {self.key} sent no data in time")
        self.state = StreamState.STARTED

    def chunk_added(self, index: object) -> None:
        """
        The owner announced chunk C{index}: read up to it.
        """
        self.tasks.run(self.read_new(index if isinstance(index, int) else None))

    async def read_new(self, upto: int | None = None) -> None:
        """
        Read the chunks this worker has not seen yet, once, and fan them
        out.  Calls that arrive while a read runs are folded into one more
        round.
        """
        if self._stopped or not self.store.available:
            return
        if self._reading:
            self._read_again = True
            return
        self._reading = True
        try:
            while True:
                self._read_again = False
                await self._read_to(upto)
                upto = None
                if not self._read_again or self._stopped:
                    break
        except Unavailable:
            pass
        finally:
            self._reading = False

    async def _read_to(self, upto: int | None) -> None:
        buffer = self.store.buffer
        latest = upto if upto is not None else await buffer.latest(self.key)
        if self.next_index is None:
            if not latest:
                return
            self.next_index = max(1, latest - self.join_chunks + 1)
        elif upto is None and latest < self.next_index - 1:
            # The index went back: Redis lost the buffer and an owner began
            # it afresh.  What it wrote before we looked is new to us.
            self.log.warn(
                "stream {key}: the buffer restarted at {latest}; following it",
                key=self.key,
                latest=latest,
            )
            self.next_index = max(1, latest - self.join_chunks + 1)
        while self.next_index <= latest and not self._stopped:
            count = min(READ_BATCH, latest - self.next_index + 1)
            found = await buffer.read(self.key, self.next_index, count)
            if not found:
                # Expired before we read it: carry on from the newest.
                self.next_index = latest
                found = await buffer.read(self.key, latest, 1)
                if not found:
                    return
            if self._stopped:
                return
            now = self.last_data_at = self.clock.seconds()
            for index, data in found:
                self.next_index = index + 1
                access = self._scanner.feed(data)
                psi = self._scanner.psi_for(access)
                self.fanout.deliver(
                    Chunk.make(index, data, now, access, psi, self._scanner.has_video)
                )

    def stopService(self) -> Deferred:
        self._stopped = True
        return MultiService.stopService(self)
