"""
What C{twistd acesim} runs: the simulated AceStream engine as a daemon, for
demos and for end-to-end tests of the proxy against a separate process.

    twistd -n acesim --port 6878 --fault playback_stall
    twistd -n acesim --source broadcast.ts

The plugin (C{twisted/plugins/acesim.py}) names this module only, so that
twistd's plugin scan, which imports every plugin, does not import the
simulator and the web stack it stands on.
"""

from __future__ import annotations

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site
from zope.interface import implementer

from acestream_proxy.testing.engine import FAULTS, SimulatedEngine
from acestream_proxy.testing.source import SourceError, load

DEFAULT_ENDPOINT = "tcp:6878:interface=127.0.0.1"
#: Bits per second of the synthetic stream when --bitrate is not given.
DEFAULT_BITRATE = 4_000_000


def _endpoint_description(port: str) -> str:
    """
    A bare port number means the loopback interface, like the default: a
    simulated engine has no business listening on the network.
    """
    if port.isdigit():
        return f"tcp:{port}:interface=127.0.0.1"
    return port


class Options(usage.Options):
    """Command line of C{twistd acesim}."""

    optParameters = [
        [
            "port",
            "p",
            DEFAULT_ENDPOINT,
            "Port number (on 127.0.0.1) or Twisted server endpoint to listen on.",
        ],
        [
            "bitrate",
            "b",
            None,
            "Bits per second of each playback stream [default: the --source "
            f"file's, from its PCRs; {DEFAULT_BITRATE} for the synthetic stream].",
            int,
        ],
        [
            "source",
            None,
            None,
            "An MPEG-TS file to play, looped, as a live broadcast instead of "
            "the synthetic stream.",
        ],
        ["batch-ms", None, 50.0, "Milliseconds between two writes of a stream.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["faults"] = []

    def opt_fault(self, name: str) -> None:
        """
        Start with this fault switched on (repeatable). One of:
        """
        if name not in FAULTS:
            raise usage.UsageError(
                f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}"
            )
        self["faults"].append(name)

    opt_fault.__doc__ = (opt_fault.__doc__ or "") + ", ".join(sorted(FAULTS))

    def postOptions(self) -> None:
        """
        Check the flags, and read the source file here: a bad file is then
        one line at startup, not a failure at the first playback.
        """
        if self["bitrate"] is not None and self["bitrate"] <= 0:
            raise usage.UsageError("--bitrate must be positive")
        if self["batch-ms"] <= 0:
            raise usage.UsageError("--batch-ms must be positive")
        self["port"] = _endpoint_description(self["port"])
        if self["source"] is None:
            if self["bitrate"] is None:
                self["bitrate"] = DEFAULT_BITRATE
            return
        try:
            self["source"] = load(self["source"])
        except SourceError as err:
            raise usage.UsageError(str(err)) from None
        if self["bitrate"] is None:
            if self["source"].bitrate is None:
                raise usage.UsageError(
                    "the --source file carries too few PCRs to tell its bitrate; "
                    "give --bitrate"
                )
            self["bitrate"] = self["source"].bitrate


@implementer(IStreamServerEndpoint)
@attrs.define(eq=False)
class AnnouncingEndpoint:
    """
    An endpoint that logs where it listens once it does, so that whoever
    started the daemon (a person, or a test that asked for port 0) learns the
    actual address.

    @ivar ports: The listening ports, once listening.
    """

    endpoint: IStreamServerEndpoint
    log: Logger
    ports: list[IListeningPort] = attrs.field(factory=list, init=False)

    def listen(self, factory: Factory) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.ports.append(port)
            address = port.getHost()
            self.log.info(
                "Simulated AceStream engine listening on http://{host}:{port}/",
                host=getattr(address, "host", str(address)),
                port=getattr(address, "port", None),
            )
            return port

        return self.endpoint.listen(factory).addCallback(listening)


def makeService(options: usage.Options) -> IService:
    """The C{acesim} service: a L{SimulatedEngine} behind a L{Site}."""
    from twisted.internet import reactor

    engine = SimulatedEngine(
        reactor,
        bitrate=options["bitrate"],
        batch_interval=options["batch-ms"] / 1000,
        faults=options["faults"],
        source=options["source"],
    )
    endpoint = AnnouncingEndpoint(
        serverFromString(reactor, options["port"]),
        Logger(namespace="acesim"),
    )
    return StreamServerEndpointService(endpoint, Site(engine.resource()))
