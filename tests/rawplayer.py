"""
A player on a plain socket with a tiny receive buffer, so that pausing it
fills its connection within a few chunks, as a stalled player on a real
network does.
"""

import socket

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol


class RawPlayer(Protocol):
    """
    A player on a plain socket: sends its request (a GET of C{path}, or the
    given C{request} bytes), keeps every byte.
    """

    def __init__(self, path: str = "/", request: bytes | None = None) -> None:
        self.request = request or (
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: raw\r\n\r\n" % path.encode()
        )
        self.raw = bytearray()
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data

    def connectionLost(self, reason) -> None:
        self.closed = True

    @property
    def head(self) -> bytes | None:
        end = self.raw.find(b"\r\n\r\n")
        return bytes(self.raw[:end]) if end >= 0 else None

    def body(self) -> bytes:
        """
        The body received so far: for a chunked response, its complete
        chunks decoded.
        """
        head = self.head
        if head is None:
            return b""
        pos = len(head) + 4
        if b"chunked" not in head.lower():
            return bytes(self.raw[pos:])
        body = bytearray()
        while True:
            end = self.raw.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(self.raw[pos:end], 16)
            if len(self.raw) < end + 4 + size:
                break
            body += self.raw[end + 2 : end + 2 + size]
            pos = end + 4 + size
        return bytes(body)

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()


def open_raw_player(port: int, path: str, rcvbuf: int = 4096) -> RawPlayer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    protocol = RawPlayer(path)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, Factory.forProtocol(lambda: protocol))
    sock.close()
    return protocol
