"""
Sending a chunk to a player's socket at once when nothing is queued before
it, and pausing the player's producer as soon as anything is.

A transport's C{write} queues the bytes and sends them on the reactor's next
turn, registering the socket for writability and unregistering it again: two
extra system calls and a reactor event per write.  The fan-out writes the
same chunk to hundreds of sockets that nearly always have room, so that
overhead would be most of its cost (DESIGN.md, decision 9).  When a plain TCP
transport has nothing queued, the chunk goes straight to its socket;
whatever the kernel does not take is queued with C{write} as usual, so
ordering, flow control and producer pausing stay the transport's.

That direct send reads what no public API offers of
L{twisted.internet.tcp.Connection}: its queue (C{dataBuffer},
C{_tempDataLen}), its state (C{connected}, C{disconnecting}) and
the socket (C{socket}).  L{fast_path} checks once per process that the running
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
INTERNALS = ("dataBuffer", "_tempDataLen", "connected", "disconnecting", "socket")


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
            return _probe(tcp.Connection(ours, None, _InertReactor()), ours, theirs)
        except Exception as e:
            return f"probing tcp.Connection raised {e!r}"


def _probe(connection, ours: socket.socket, peer: socket.socket) -> str | None:
    missing = [name for name in INTERNALS if not hasattr(connection, name)]
    if missing:
        return "tcp.Connection has no " + ", ".join(missing)
    if type(connection.dataBuffer) is not bytes or connection.dataBuffer:
        return f"a new connection's dataBuffer is {connection.dataBuffer!r}, not empty bytes"
    if type(connection._tempDataLen) is not int or connection._tempDataLen:
        return f"a new connection's _tempDataLen is {connection._tempDataLen!r}, not 0"
    if connection.socket is not ours:
        return "tcp.Connection.socket is not the socket it was made with"
    connection.connected = 1
    sent = connection.socket.send(b"probe")
    peer.setblocking(False)
    try:
        received = peer.recv(16)
    except BlockingIOError:
        received = b""
    if sent != 5 or received != b"probe":
        return f"socket.send(b'probe') returned {sent!r} and sent {received!r}"
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


def writers(transport) -> tuple[Callable[[bytes], None], Callable[[list], int] | None]:
    """
    A player's C{write} and C{write_many} for its C{transport}, sharing one
    queueing write (see L{pausing_writer}).  For any transport other than
    plain TCP, or when L{fast_path} is off, that queueing write alone and
    no C{write_many}.
    """
    queue = pausing_writer(transport)
    if not _plain_tcp(transport) or not fast_path().on:
        return queue, None
    return _direct_writer(transport, queue), _batch_writer(transport, queue)


def _direct_writer(transport, queue: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """
    A C{write} that sends immediately when it can, and whenever it leaves
    bytes queued it pauses the transport's producer through C{queue}.

    The send calls the socket itself: C{writeSomeData} would add a
    memoryview, a retry wrapper for C{EINTR} (which Python retries on its
    own) and two calls per chunk and player.
    """
    send = transport.socket.send

    def write(data: bytes) -> None:
        # _must_queue, inlined: this runs per chunk and player.
        if (
            transport.dataBuffer
            or transport._tempDataLen
            or transport.disconnecting
            or not transport.connected
        ):
            queue(data)
            return
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Queue it: the transport then meets the error itself and
            # reports the connection lost through its usual path.
            queue(data)
            return
        if sent < len(data):
            queue(data[sent:] if sent else data)

    return write


def _batch_writer(transport, queue: Callable[[bytes], None]) -> Callable[[list], int]:
    """
    A C{write_many} for a player that is behind: it hands several buffers
    to the kernel in one C{sendmsg}, and queues the rest of the first one
    the kernel does not take whole, which pauses the producer as the
    direct write does.  It returns how many buffers it handed over (sent
    or queued), at least one.
    """
    sendmsg = transport.socket.sendmsg

    def write_many(buffers: list) -> int:
        if _must_queue(transport):
            queue(buffers[0])
            return 1
        try:
            sent = sendmsg(buffers)
        except BlockingIOError:
            sent = 0
        except OSError:
            queue(buffers[0])
            return 1
        for handed, data in enumerate(buffers, 1):
            if sent < len(data):
                queue(data[sent:] if sent else data)
                return handed
            sent -= len(data)
        return len(buffers)

    return write_many


def _must_queue(transport) -> bool:
    """
    Whether a write must go behind what the transport has queued (or meet
    its closing) rather than straight to the socket.
    """
    return bool(
        transport.dataBuffer
        or transport._tempDataLen
        or transport.disconnecting
        or not transport.connected
    )


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

    def queue(data: bytes) -> None:
        limit = transport.bufferSize
        transport.bufferSize = 0
        try:
            write(data)
        finally:
            transport.bufferSize = limit

    return queue


def _plain_tcp(transport) -> bool:
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)


def _plain_descriptor(transport) -> bool:
    return isinstance(transport, abstract.FileDescriptor) and not getattr(transport, "TLS", False)
