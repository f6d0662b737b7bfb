"""
Sending a chunk to a player's socket at once when nothing is queued before
it.

A transport's C{write} queues the bytes and sends them on the reactor's next
turn, registering the socket for writability and unregistering it again: two
extra system calls and a reactor event per write.  The fan-out writes the
same chunk to hundreds of sockets that nearly always have room, so that
overhead would be most of its cost (DESIGN.md, decision 9).  When a plain TCP
transport has nothing queued, the chunk goes straight to C{writeSomeData};
whatever the kernel does not take is queued with C{write} as usual, so
ordering, flow control and producer pausing stay the transport's.
"""

from typing import Callable

from twisted.internet import tcp


def direct_writer(transport) -> Callable[[bytes], None]:
    """
    A C{write} for C{transport} that sends immediately when it can; for any
    transport other than plain TCP, its own C{write}.
    """
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return transport.write
    queue = transport.write
    send = transport.writeSomeData

    def write(data: bytes) -> None:
        if (
            transport.dataBuffer
            or transport._tempDataLen
            or transport.disconnecting
            or not transport.connected
        ):
            queue(data)
            return
        sent = send(data)
        if isinstance(sent, Exception):
            # Queue it: the transport then meets the error itself and
            # reports the connection lost through its usual path.
            queue(data)
        elif sent < len(data):
            queue(data[sent:])

    return write
