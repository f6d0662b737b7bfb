"""
Tests for L{acestream_proxy.http.reuseport}: listeners that share one TCP
port (C{SO_REUSEPORT}), on real sockets of the loopback interface, and the
service the daemon builds with C{reuse_port}.
"""

import socket

import pytest
import pytest_twisted

from acestream_proxy.http.listening import ListenFailed
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol

from acestream_proxy.config import Config
from acestream_proxy.config_checks import is_tcp
from acestream_proxy.http.reuseport import ReusePortEndpoint
from acestream_proxy.service import make_service

from .support import eventually

#: Connections made to a shared port: with the kernel spreading them by a
#: hash of each one's source port, the chance that every one of them goes
#: to the same of two listeners is 2 in 2**64.
CONNECTIONS = 64


class Counting(Factory):
    """
    Counts the connections it accepted.
    """

    def __init__(self) -> None:
        self.accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        return Protocol()


def connect(host: str, port: int, count: int, family=socket.AF_INET) -> list[socket.socket]:
    """
    C{count} connections to C{host}:C{port}, each from its own source port,
    left open until accepted (the kernel completes them by itself).
    """
    clients = []
    for _ in range(count):
        client = socket.socket(family, socket.SOCK_STREAM)
        client.connect((host, port))
        clients.append(client)
    return clients


def close(clients: list[socket.socket]) -> None:
    for client in clients:
        client.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --- the endpoint ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_listeners_share_one_port_and_both_accept():
    """
    Two endpoints of one process listen on the same port of 127.0.0.1 and
    both accept connections.  Once one has stopped listening, the other
    takes every connection; once both have, the port is closed.
    """
    first_factory, second_factory = Counting(), Counting()
    first = await ReusePortEndpoint(reactor, 0, "127.0.0.1").listen(first_factory)
    port = first.getHost().port
    second = await ReusePortEndpoint(reactor, port, "127.0.0.1").listen(second_factory)
    assert first.getHost() == second.getHost() == IPv4Address("TCP", "127.0.0.1", port)
    try:
        clients = connect("127.0.0.1", port, CONNECTIONS)
        await eventually(
            lambda: first_factory.accepted + second_factory.accepted == CONNECTIONS,
            what="every connection accepted",
        )
        close(clients)
        assert first_factory.accepted > 0 and second_factory.accepted > 0, (
            first_factory.accepted,
            second_factory.accepted,
        )

        await maybeDeferred(first.stopListening)
        before = first_factory.accepted, second_factory.accepted
        clients = connect("127.0.0.1", port, 16)
        await eventually(
            lambda: second_factory.accepted == before[1] + 16, what="the second listener's"
        )
        close(clients)
        assert first_factory.accepted == before[0]
    finally:
        await maybeDeferred(first.stopListening)
        await maybeDeferred(second.stopListening)
    with pytest.raises(ConnectionRefusedError):
        connect("127.0.0.1", port, 1)


@pytest_twisted.ensureDeferred
async def test_a_port_held_without_reuse_port_is_not_shared():
    """
    A port listened on without C{SO_REUSEPORT} (Twisted's own C{tcp:}) is
    not shared, either way round: binding fails with L{CannotListenError}.
    """
    plain = reactor.listenTCP(0, Counting(), interface="127.0.0.1")
    try:
        with pytest.raises(CannotListenError):
            await ReusePortEndpoint(reactor, plain.getHost().port, "127.0.0.1").listen(Counting())
    finally:
        await maybeDeferred(plain.stopListening)

    shared = await ReusePortEndpoint(reactor, 0, "127.0.0.1").listen(Counting())
    try:
        with pytest.raises(CannotListenError):
            reactor.listenTCP(shared.getHost().port, Counting(), interface="127.0.0.1")
    finally:
        await maybeDeferred(shared.stopListening)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
@pytest_twisted.ensureDeferred
async def test_ipv6_listeners_share_one_port():
    """
    An IPv6 C{interface=} gives IPv6 sockets, which share a port as well.
    """
    first_factory, second_factory = Counting(), Counting()
    first = await ReusePortEndpoint.from_description(
        reactor, "tcp:0:interface=\\:\\:1"
    ).listen(first_factory)
    port = first.getHost().port
    second = await ReusePortEndpoint.from_description(
        reactor, f"tcp6:{port}:interface=\\:\\:1"
    ).listen(second_factory)
    try:
        assert isinstance(second.getHost(), IPv6Address)
        assert (second.getHost().host, second.getHost().port) == ("::1", port)
        clients = connect("::1", port, CONNECTIONS, socket.AF_INET6)
        await eventually(
            lambda: first_factory.accepted + second_factory.accepted == CONNECTIONS,
            what="every connection accepted",
        )
        close(clients)
        assert first_factory.accepted > 0 and second_factory.accepted > 0
    finally:
        await maybeDeferred(first.stopListening)
        await maybeDeferred(second.stopListening)


@pytest.mark.parametrize(
    ("description", "port", "interface", "backlog", "family"),
    [
        ("tcp:8000", 8000, "", 50, socket.AF_INET),
        ("tcp:port=8001:interface=127.0.0.1:backlog=7", 8001, "127.0.0.1", 7, socket.AF_INET),
        ("tcp:8002:interface=\\:\\:1", 8002, "::1", 50, socket.AF_INET6),
        ("tcp:8003:interface=fe80\\:\\:1%lo", 8003, "fe80::1%lo", 50, socket.AF_INET6),
        ("tcp6:8004", 8004, "::", 50, socket.AF_INET6),
    ],
)
def test_description_parsed_as_twisted_parses_it(description, port, interface, backlog, family):
    endpoint = ReusePortEndpoint.from_description(reactor, description)
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (port, interface, backlog)
    assert endpoint.family == family
    assert is_tcp(description)


@pytest.mark.parametrize(
    "description", ["unix:/run/aceproxy.sock", "ssl:8443", "systemd:domain=INET:index=0"]
)
def test_other_endpoints_are_not_tcp(description):
    assert not is_tcp(description)


def test_unix_description_refused():
    with pytest.raises(ValueError):
        ReusePortEndpoint.from_description(reactor, "unix:/run/aceproxy.sock")


# --- the daemon's listener -------------------------------------------------------


def listener(config: Config):
    return make_service(config, reactor).getServiceNamed("http")


def test_daemon_listens_on_a_shared_port_with_reuse_port():
    service = listener(
        Config(
            listen="tcp:8123:interface=127.0.0.1:backlog=128",
            reuse_port=True,
            redis="redis://127.0.0.1:1/0",
        )
    )
    assert isinstance(service, StreamServerEndpointService)
    assert service.endpoint == ReusePortEndpoint(reactor, 8123, "127.0.0.1", 128)


def test_daemon_listens_as_twisted_does_without_reuse_port():
    service = listener(Config(listen="tcp:8123:interface=127.0.0.1"))
    assert not isinstance(service.endpoint, ReusePortEndpoint)


@pytest_twisted.ensureDeferred
async def test_the_daemon_listener_stops_listening_when_stopped():
    """
    The listener service of C{reuse_port} binds at start (failing the
    start if it cannot, as C{strports.service} does) and closes the port
    when stopped.
    """
    first = await ReusePortEndpoint(reactor, 0, "127.0.0.1").listen(Counting())
    port = first.getHost().port
    await maybeDeferred(first.stopListening)
    config = Config(
        listen=f"tcp:{port}:interface=127.0.0.1", reuse_port=True, redis="redis://127.0.0.1:1/0"
    )
    service = listener(config)
    service.startService()
    try:
        close(connect("127.0.0.1", port, 1))
    finally:
        await service.stopService()
    with pytest.raises(ConnectionRefusedError):
        connect("127.0.0.1", port, 1)

    plain = reactor.listenTCP(port, Counting(), interface="127.0.0.1")
    try:
        with pytest.raises(ListenFailed):
            listener(config).startService()
    finally:
        await maybeDeferred(plain.stopListening)
