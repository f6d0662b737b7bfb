"""
Listening on a TCP port that other processes listen on too (C{SO_REUSEPORT}),
so that several workers on one host share the players' port and the kernel
spreads the connections among them.

Twisted's C{tcp:} endpoint has no such option: the socket is made here,
bound and set listening, then handed to the reactor with C{adoptStreamPort}.
"""

import socket

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import abstract
from twisted.internet.defer import execute
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
@attrs.frozen
class ReusePortEndpoint:
    """
    A TCP server endpoint whose socket has C{SO_REUSEADDR} and
    C{SO_REUSEPORT} set, so that several processes of one user may listen
    on the same address and port.

    @ivar interface: The address to bind, as in C{tcp:...:interface=};
        C{""} is every IPv4 address, an IPv6 address makes an IPv6 socket.
    """

    reactor: object
    port: int
    interface: str = ""
    backlog: int = 50

    @classmethod
    def from_description(cls, reactor, description: str) -> "ReusePortEndpoint":
        """
        The endpoint for a C{tcp:} (or C{tcp6:}) description, whose port,
        C{interface=} and C{backlog=} Twisted's own parser reads, escapes
        and defaults included.
        """
        parsed = serverFromString(reactor, description)
        if not isinstance(parsed, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
            raise ValueError(f"not a TCP endpoint description: {description!r}")
        return cls(reactor, parsed._port, parsed._interface, parsed._backlog)

    @property
    def family(self) -> int:
        """
        IPv6 for an IPv6 address, else IPv4, as Twisted's own TCP port does.
        """
        return socket.AF_INET6 if abstract.isIPv6Address(self.interface) else socket.AF_INET

    def listen(self, protocolFactory):
        return execute(self._listen, protocolFactory)

    def _listen(self, factory) -> IListeningPort:
        try:
            listening = socket.socket(self.family, socket.SOCK_STREAM)
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from None
        try:
            try:
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                listening.bind(self._address())
                listening.listen(self.backlog)
                listening.setblocking(False)
            except OSError as e:
                raise CannotListenError(self.interface, self.port, e) from None
            # The reactor's port holds a duplicate of the descriptor: this
            # one is closed below, the port's own by its stopListening.
            return self.reactor.adoptStreamPort(listening.fileno(), self.family, factory)
        finally:
            listening.close()

    def _address(self) -> tuple:
        if self.family == socket.AF_INET:
            return (self.interface, self.port)
        # A scope (fe80::1%eth0) becomes the address' scope id.
        return socket.getaddrinfo(
            self.interface, self.port, socket.AF_INET6, socket.SOCK_STREAM, 0,
            socket.AI_NUMERICHOST,
        )[0][4]


def reuse_port_service(reactor, description: str, factory) -> StreamServerEndpointService:
    """
    A service listening with C{factory} on the TCP port of C{description},
    shared with other processes; stopping it closes the port.  As with
    C{strports.service}, a port that cannot be bound fails the start.
    """
    service = StreamServerEndpointService(
        ReusePortEndpoint.from_description(reactor, description), factory
    )
    service._raiseSynchronously = True
    return service
