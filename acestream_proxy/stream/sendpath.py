"""
Sending a chunk to a player's socket at once when nothing is queued before
it, and pausing the player's producer as soon as anything is.

A transport's C{write} queues the bytes and sends them on the reactor's next
turn, registering the socket for writability and unregistering it again: two
extra system calls and a reactor event per write.  The fan-out writes the
same chunk to hundreds of sockets that nearly always have room, so that
overhead would be most of its cost (DESIGN.md, decision 9).  When a plain TCP
transport has nothing queued, the chunk goes straight to C{writeSomeData};
whatever the kernel does not take is queued with C{write} as usual, so
ordering, flow control and producer pausing stay the transport's.

That direct send reads what no public API offers of
L{twisted.internet.tcp.Connection}: its queue (C{dataBuffer},
C{_tempDataLen}), its state (C{connected}, C{disconnecting}) and
C{writeSomeData}.  L{fast_path} checks once per process that the running
Twisted still has them and behaves as expected; if not, players are sent to
through the public C{write} alone, and one warning says why.
"""

import functools
import socket
from typing import Callable

import attrs
from twisted.internet import abstract, tcp
from twisted.logger import Logger

import twisted

log = Logger()

#: What the direct send reads of a L{tcp.Connection} besides its public API.
INTERNALS = ("dataBuffer", "_tempDataLen", "connected", "disconnecting", "writeSomeData")


@attrs.frozen
class FastPath:
    """
    Whether this process's Twisted is the one the direct send was written
    against.

    @ivar reason: why the direct send is off, or L{None} when it is on.
    """

    reason: str | None = None

    @property
    def on(self) -> bool:
        return self.reason is None


@functools.cache
def fast_path() -> FastPath:
    """
    Probe the running Twisted's L{tcp.Connection} once per process; when it
    does not match, log a single warning: every player then goes through the
    public C{write}, slower, but which no change to Twisted's internals can
    break (a direct send that overtook queued bytes would corrupt streams).
    """
    reason = _mismatch()
    if reason is not None:
        log.warn(
            "Direct send to players is off, chunks go through transport.write: {reason}",
            reason=reason,
            twisted_version=twisted.__version__,
        )
    return FastPath(reason)


def _mismatch() -> str | None:
    """
    Why the direct send cannot be trusted with this Twisted, or L{None}.
    Probed on a real connection object over a socket pair, so that
    instance attributes and behaviour are checked, not just names.
    """
    try:
        ours, theirs = socket.socketpair()
    except OSError as e:
        return f"no socket pair to probe tcp.Connection with: {e}"
    with ours, theirs:
        try:
            return _probe(tcp.Connection(ours, None, _InertReactor()), theirs)
        except Exception as e:
            return f"probing tcp.Connection raised {e!r}"


def _probe(connection, peer: socket.socket) -> str | None:
    missing = [name for name in INTERNALS if not hasattr(connection, name)]
    if missing:
        return "tcp.Connection has no " + ", ".join(missing)
    if type(connection.dataBuffer) is not bytes or connection.dataBuffer:
        return f"a new connection's dataBuffer is {connection.dataBuffer!r}, not empty bytes"
    if type(connection._tempDataLen) is not int or connection._tempDataLen:
        return f"a new connection's _tempDataLen is {connection._tempDataLen!r}, not 0"
    connection.connected = 1
    sent = connection.writeSomeData(b"probe")
    peer.setblocking(False)
    try:
        received = peer.recv(16)
    except BlockingIOError:
        received = b""
    if sent != 5 or received != b"probe":
        return f"writeSomeData(b'probe') returned {sent!r} and sent {received!r}"
    # The direct send must see whatever write() has queued, or it would
    # overtake it.
    connection.write(b"queued")
    if connection._tempDataLen != 6:
        return f"write() of 6 bytes left _tempDataLen at {connection._tempDataLen!r}"
    return None


class _InertReactor:
    """
    Enough of a reactor for a probed connection to be written to: it is
    never watched.
    """

    def addReader(self, reader) -> None:
        pass

    def addWriter(self, writer) -> None:
        pass

    def removeReader(self, reader) -> None:
        pass

    def removeWriter(self, writer) -> None:
        pass


def direct_writer(transport) -> Callable[[bytes], None]:
    """
    A C{write} for a player's C{transport}: it sends immediately when it
    can, and whenever it leaves bytes queued it pauses the transport's
    producer (see L{pausing_writer}).  For any transport other than plain
    TCP, or when L{fast_path} is off, that queueing write alone.
    """
    queue = pausing_writer(transport)
    if not _plain_tcp(transport) or not fast_path().on:
        return queue
    return _DirectWrite(transport, transport.writeSomeData, queue)


class _DirectWrite:
    """
    The write of L{direct_writer}: one small object per player (its
    transport's C{writeSomeData} and queueing write taken once) rather
    than closures and their cells.
    """

    __slots__ = ("transport", "send", "queue")

    def __init__(self, transport, send: Callable[[bytes], object], queue: Callable[[bytes], None]):
        self.transport = transport
        self.send = send
        self.queue = queue

    def __call__(self, data: bytes) -> None:
        transport = self.transport
        if (
            transport.dataBuffer
            or transport._tempDataLen
            or transport.disconnecting
            or not transport.connected
        ):
            self.queue(data)
            return
        sent = self.send(data)
        if isinstance(sent, Exception):
            # Queue it: the transport then meets the error itself and
            # reports the connection lost through its usual path.
            self.queue(data)
        elif sent < len(data):
            self.queue(data[sent:])


def pausing_writer(transport) -> Callable[[bytes], None]:
    """
    C{transport.write}, made to pause the transport's streaming producer as
    soon as anything is left queued, rather than once more than
    C{bufferSize} (64 KiB) is.

    A player that stopped reading then holds at most about one chunk of our
    memory, and catches up from the shared window when it reads again.

    Why lower C{bufferSize} for the duration of the write, and not for the
    connection's life or by pausing the player's producer directly:

      - C{bufferSize} is also how many bytes a transport reads per recv().
        Set to 1 for good, a player that sends bytes after its request would
        cost a system call (and a C{dataReceived}) per byte.  Lowered only
        while C{write} runs, it is back to its own value before the reactor
        next reads: reads stay normal-sized.

      - The transport's producer is not the player's but the L{HTTPChannel},
        which passes pause and resume on to its request's producer and keeps
        its own state (C{_waitingForTransport}) in step.  And
        L{FileDescriptor.doWrite} calls a streaming producer's
        C{resumeProducing} only if it paused that producer itself (its
        C{producerPaused}).  A producer that paused itself behind their
        backs would never be resumed.  C{write} pausing its producer when
        more than C{bufferSize} is queued, and C{doWrite} resuming it when
        the queue drains, is C{FileDescriptor}'s documented contract: the
        whole chain, channel included, is paused and resumed by Twisted.

    For a transport that is not a plain TCP C{FileDescriptor} (TLS, a test's
    string transport), its own C{write}.
    """
    write = transport.write
    if not _plain_descriptor(transport):
        return write
    return _PausingWrite(transport, write)


class _PausingWrite:
    """
    The write of L{pausing_writer}, as one small object per player.
    """

    __slots__ = ("transport", "write")

    def __init__(self, transport, write: Callable[[bytes], None]):
        self.transport = transport
        self.write = write

    def __call__(self, data: bytes) -> None:
        transport = self.transport
        limit = transport.bufferSize
        transport.bufferSize = 0
        try:
            self.write(data)
        finally:
            transport.bufferSize = limit


def _plain_tcp(transport) -> bool:
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)


def _plain_descriptor(transport) -> bool:
    return isinstance(transport, abstract.FileDescriptor) and not getattr(transport, "TLS", False)
