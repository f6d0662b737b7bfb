"""
The players' listener, whose failure to listen (a port already in use, an
address not on this host) is one line naming the endpoint and how to choose
another, instead of the traceback twistd would print.
"""

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError

from .reuseport import ReusePortEndpoint


class ListenFailed(Exception):
    """
    The daemon cannot listen where it was told to; the message is one line
    fit for the operator.
    """


class ListeningService(StreamServerEndpointService):
    """
    A L{StreamServerEndpointService} that listens at once when started, as
    C{strports.service} does, and raises L{ListenFailed} when it cannot.
    """

    def __init__(self, endpoint, factory, description: str) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self):
        try:
            return super().privilegedStartService()
        except CannotListenError as e:
            self._waitingForPort = None
            raise ListenFailed(listen_failure(self.description, e)) from None


def listen_failure(description: str, error: CannotListenError) -> str:
    why = error.socketError
    why = getattr(why, "strerror", None) or str(why)
    return (
        f"cannot listen on {description}: {why.rstrip('.').lower()};"
        " choose another endpoint with --listen (e.g. --listen tcp:8001)"
        " or listen in the configuration file"
    )


def listening_service(reactor, description: str, factory, reuse_port: bool = False):
    """
    The service listening with C{factory} on C{description}, shared with
    other workers through C{SO_REUSEPORT} if C{reuse_port}.
    """
    if reuse_port:
        endpoint = ReusePortEndpoint.from_description(reactor, description)
    else:
        endpoint = serverFromString(reactor, description)
    return ListeningService(endpoint, factory, description)
