"""
Twisted's HTTP server, hardened for clients that are careless or hostile.

Twisted's own L{HTTPChannel} reads any request body (spooling it to a
temporary file past 100 KB), keeps a connection whose request headers
trickle in a byte at a time for as long as bytes come (each restarts its
idle timeout), and holds whatever a client sends while its response runs.
The proxy's routes take no body and its players send nothing once they
asked, so here:

  - a request with a body is answered C{413} after at most one read, and no
    body is ever stored;
  - request headers must be complete within C{header_timeout} of the
    connection (or of the previous response), else C{408} and the connection
    is closed; a response, however long it streams, is never cut by that;
  - past L{SEND_ALLOWANCE} bytes received while a response runs (a pipelined
    request or two fit), the connection is closed;
  - past C{max_connections_per_address}, a client's connection is answered
    C{503} with C{Retry-After} and closed.

Every refusal is JSON C{{"error": ...}}, written here directly: the request
never reaches the routes.  Only HTTP/1.1 is offered (no HTTP/2 over TLS),
since only this channel carries the limits.
"""

import json
from io import BytesIO

from twisted.logger import Logger
from twisted.web import server
from twisted.web.http import RESPONSES, HTTPChannel

from ..stream.registry import LIMIT_RETRY_AFTER
from .limits import ClientLimits

log = Logger()

#: Bytes a connection may send while its response runs: room for a
#: pipelined request or two, far less than what a connection that keeps
#: sending would cost.
SEND_ALLOWANCE = 64 * 1024


def canned_response(
    status: int, message: str, *, head: bool = False, retry_after: int | None = None
) -> bytes:
    """
    A complete JSON error response that closes its connection, for answers
    given before (or instead of) a request reaching the routes.  For a
    C{HEAD} request, the headers alone.
    """
    body = json.dumps({"error": message}).encode() + b"\n"
    lines = [
        b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error")),
        b"Content-Type: application/json",
        b"Cache-Control: no-store",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    if retry_after is not None:
        lines.append(b"Retry-After: %d" % retry_after)
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


class ProxyRequest(server.Request):
    """
    A request whose content is never a file: the channel refuses any body
    before this is asked for a place to put it, and should that ever change,
    memory is a bounded place (the channel's allowance), a disk is not.
    """

    def gotLength(self, length):
        self.content = BytesIO()


class ProxyChannel(HTTPChannel):
    """
    L{HTTPChannel} with the limits of this module.

    @ivar client: the client's key in L{ClientLimits}, or L{None} when it
        is not limited.
    @ivar header_timeout: seconds a client has to complete its request
        headers; L{None} for no deadline.
    """

    client: str | None = None
    header_timeout: float | None = None
    _admitted = False
    _closing = False
    _deadline = None
    _held = 0

    @property
    def limits(self) -> ClientLimits:
        return self.site.limits

    def connectionMade(self) -> None:
        super().connectionMade()
        self.client = self.limits.key(self.transport.getPeer())
        self._admitted = self.limits.admit_connection(self.client)
        self._start_deadline()

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        if self._admitted:
            self._admitted = False
            self.limits.release_connection(self.client)
        super().connectionLost(reason)

    # Reading

    def dataReceived(self, data: bytes) -> None:
        if not self._closing:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not self._closing:
            super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        """
        The request's head is complete: refuse it here if its client is over
        its connection limit or it has a body, before a byte of the body is
        looked at or anywhere to put it is made.

        A connection over the limit is answered once its head is in, not as
        soon as it is made: closing a socket with a request unread in it
        resets the connection, and the client would most likely never see
        the 503.  The header deadline bounds how long it waits.
        """
        self._cancel_deadline()
        head = self._command == b"HEAD"
        if not self._admitted:
            log.info(
                "refused a request from {client}: it has {limit} connections open already",
                client=self.client,
                limit=self.limits.max_connections,
            )
            self._refuse(
                503,
                "too many connections from this address",
                head=head,
                retry_after=LIMIT_RETRY_AFTER,
            )
        elif self.length != 0:
            log.info(
                "refused a request body from {client} ({method} {path})",
                client=self._peer(),
                method=self._command.decode("latin-1"),
                path=self._path.decode("latin-1")[:200],
            )
            self._refuse(413, "this proxy accepts no request body", head=head)
        else:
            super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self._closing:
            super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        """
        While a response runs, what the client sends is held for after it
        (a pipelined request), within L{SEND_ALLOWANCE}.

        Twisted's own channel stops reading past 16 KB instead, unless the
        response is waiting for the socket to drain (as a streaming player's
        often is), when it holds everything; and it sums what it holds on
        every read.  Here what is held is counted as it comes, and a client
        that sends past the allowance is cut off: a player has no reason to.
        """
        if self._closing:
            return
        if not self._handlingRequest:
            # A request body: refused in allHeadersReceived, never reached.
            return super().rawDataReceived(data)
        self._held += len(data)
        if self._held > SEND_ALLOWANCE:
            log.warn(
                "closing the connection of {client}: it sent {size} bytes while its"
                " response ran",
                client=self._peer(),
                size=self._held,
            )
            self._closing = True
            self.transport.abortConnection()
            return
        self._dataBuffer.append(data)

    def requestDone(self, request) -> None:
        """
        A response is over: the next request's headers have their deadline
        from now, set before the bytes held meanwhile are read.
        """
        self._held = 0
        if self.persistent:
            self._start_deadline()
        super().requestDone(request)

    # The header deadline

    def _start_deadline(self) -> None:
        self._cancel_deadline()
        if self.header_timeout:
            self._deadline = self.callLater(self.header_timeout, self._headers_late)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        """
        No complete request head in time: a client that began one (its
        request line is parsed, or part of it is buffered) is told (408) and
        logged; an idle connection is just closed, as a client that kept it
        for later expects it may be, and as is too ordinary to log.
        """
        self._deadline = None
        if self.requests or self._buffer:
            log.info(
                "closing the connection of {client}: no complete request headers within"
                " {timeout}s",
                client=self._peer(),
                timeout=self.header_timeout,
            )
            self._refuse(408, "the request headers took too long")
        else:
            self._closing = True
            self.loseConnection()

    # Refusing

    def _refuse(self, status: int, message: str, **options) -> None:
        """
        Answer C{status} and close, reading nothing more: the request is
        never handed to the routes.
        """
        self._closing = True
        self._cancel_deadline()
        self.transport.write(canned_response(status, message, **options))
        self.loseConnection()

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return getattr(peer, "host", None) or str(peer)


class ProxySite(server.Site):
    """
    A L{server.Site} of L{ProxyChannel}s sharing one L{ClientLimits}.
    """

    protocol = ProxyChannel
    requestFactory = ProxyRequest
    displayTracebacks = False
    #: No "Starting factory" / "Stopping factory" lines: the port's own
    #: "Site starting on 8000" says it all.
    noisy = False

    def __init__(self, resource, limits: ClientLimits, header_timeout: float, reactor=None):
        super().__init__(resource, reactor=reactor)
        self.limits = limits
        self.header_timeout = header_timeout

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.header_timeout = self.header_timeout
        return channel

    def logPrefix(self) -> str:
        """
        What Twisted's listening port logs this site as: "Site starting on
        8000", as for a plain site, a line operators and tests look for.
        """
        return "Site"

    def acceptableProtocols(self):
        """HTTP/1.1 only: HTTP/2 would bypass L{ProxyChannel}."""
        return [b"http/1.1"]
