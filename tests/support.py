"""
Test support: the simulated engine and the proxy on real sockets of
127.0.0.1, and players that read with treq and keep every byte they got.
"""

from typing import Callable

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web.client import ResponseDone
from twisted.web.server import Site

from acestream_proxy.config import Config, EngineConfig, Tuning
from acestream_proxy.http.routes import make_site
from acestream_proxy.service import make_service
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing.engine import SimulatedEngine, content_tag
from acestream_proxy.testing.synthetic import verify

HASHES = [("%02x" % n) * 20 for n in range(1, 10)]


def check_whole_packets(data: bytes | bytearray, key: str, allowed_jumps: int = 0):
    """
    C{data} is whole TS packets of C{key}'s broadcast, in order, with at
    most C{allowed_jumps} gaps.  A body still arriving may end inside a
    packet: only the whole packets are judged.
    """
    data = bytes(data)
    report = verify(
        data[: len(data) - len(data) % PACKET_SIZE],
        allowed_jumps=allowed_jumps,
        content_tag=content_tag(key),
    )
    assert report.ok, report.describe()
    return report


async def eventually(predicate: Callable[[], object], timeout: float = 10.0, what: str = ""):
    """
    Wait on the real reactor until C{predicate()} is true: for conditions
    that depend on other processes or sockets, never as a fixed sleep.
    """
    waited = 0.0
    while True:
        value = predicate()
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


@attrs.define
class RunningEngine:
    engine: SimulatedEngine
    port: object

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def config(self, engine_id: str, forwarded: bool = False) -> EngineConfig:
        return EngineConfig(engine_id, self.url, forwarded)

    def stop(self) -> Deferred:
        self.engine.drop_playback()
        return self.port.stopListening()


def start_engine(**kwargs) -> RunningEngine:
    engine = SimulatedEngine(reactor, **kwargs)
    port = reactor.listenTCP(0, Site(engine.resource()), interface="127.0.0.1")
    return RunningEngine(engine, port)


@attrs.define
class RunningProxy:
    service: object
    port: object

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @property
    def registry(self):
        return self.service.getServiceNamed("streams")

    def stream_url(self, key: str, param: str = "id") -> str:
        return f"{self.url}/ace/getstream?{param}={key}"

    @inlineCallbacks
    def stop(self):
        yield self.service.stopService()
        yield self.port.stopListening()


@inlineCallbacks
def start_proxy(
    engines: list[EngineConfig], admin_token: str | None = None, redis: str | None = None, **tuning
):
    config = Config(
        listen="tcp:0:interface=127.0.0.1",
        admin_token=admin_token,
        redis=redis,
        engines=tuple(engines),
        tuning=Tuning(**tuning),
    )
    service = make_service(config, reactor, listen=False)
    service.startService()
    # The first engine probe runs at start; let it finish so selection sees
    # every engine's health.
    yield service.getServiceNamed("streams").engines.probe()
    port = reactor.listenTCP(
        0, make_site(service.getServiceNamed("streams"), config), interface="127.0.0.1"
    )
    return RunningProxy(service, port)


class _Body(Protocol):
    def __init__(self, player: "Player") -> None:
        self.player = player

    def dataReceived(self, data: bytes) -> None:
        self.player._received(data)

    def connectionLost(self, reason) -> None:
        self.player._ended(reason)


@attrs.define(eq=False)
class Player:
    """
    A player reading a stream body.  C{data} holds every byte received,
    C{clean_end} tells whether the body ended with the chunked terminator.
    """

    response: object
    data: bytearray = attrs.field(factory=bytearray)
    ended: Deferred = attrs.field(factory=Deferred)
    clean_end: bool | None = None
    _transport: object = None
    _waiting: list = attrs.field(factory=list)

    @classmethod
    async def open(cls, url: str, headers=None) -> "Player":
        response = await treq.get(url, unbuffered=True, headers=headers)
        player = cls(response)
        if response.code == 200:
            protocol = _Body(player)
            response.deliverBody(protocol)
            player._transport = protocol.transport
        return player

    def _received(self, data: bytes) -> None:
        self.data += data
        waiting, self._waiting = self._waiting, []
        for size, d in waiting:
            if len(self.data) >= size:
                d.callback(len(self.data))
            else:
                self._waiting.append((size, d))

    def _ended(self, reason) -> None:
        self.clean_end = bool(reason.check(ResponseDone))
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(AssertionError(f"body ended at {len(self.data)} bytes"))
        self.ended.callback(self.clean_end)

    def wait_bytes(self, size: int, timeout: float = 10.0) -> Deferred:
        """
        Fire once at least C{size} bytes have arrived in all.
        """
        if len(self.data) >= size:
            return Deferred.fromCoroutine(_now(len(self.data)))
        d = Deferred()
        self._waiting.append((size, d))
        return d.addTimeout(timeout, reactor)

    def more(self, size: int, timeout: float = 10.0) -> Deferred:
        """
        Fire once C{size} more bytes have arrived.
        """
        return self.wait_bytes(len(self.data) + size, timeout)

    def pause(self) -> None:
        self._transport.pauseProducing()

    def resume(self) -> None:
        self._transport.resumeProducing()

    def disconnect(self) -> None:
        """
        Drop the connection abruptly, as a killed player does.
        """
        self._transport.stopProducing()

    async def json(self):
        return await treq.json_content(self.response)


async def _now(value):
    return value
