"""
Test support: the simulated engine and the proxy on real sockets of
127.0.0.1, and players that read with treq and keep every byte they got.
"""

import weakref
from typing import Callable

import attrs
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
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
    that depend on other processes or sockets, never as a fixed sleep.  The
    proxy's own logic (its timers, states and limits) is driven on a
    L{task.Clock} instead, and what it offers to await (a stream's stop, a
    player's bytes, a lost connection: see below) is awaited.
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
    return (yield serve(config))


def workers_of(running_engine, redis_url: str, defaults: dict):
    """
    The body of a fixture of in-process workers on one Redis and one
    engine: yields C{start(**tuning)}, which starts one (with C{defaults}
    under C{tuning}); each is stopped at teardown unless the test stopped
    it already.
    """
    started = []

    async def start(**tuning):
        proxy = await start_proxy(
            [running_engine.config("engine-a")], redis=redis_url, **{**defaults, **tuning}
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.service.running:
            pytest_twisted.blockon(proxy.service.stopService())
        pytest_twisted.blockon(proxy.port.stopListening())


@inlineCallbacks
def serve(config: Config, **site_options):
    """
    Run the daemon of C{config} on a free port of 127.0.0.1, its site made
    with C{site_options}.
    """
    service = make_service(config, reactor, listen=False)
    service.startService()
    # The first engine probe runs at start; let it finish so selection sees
    # every engine's health.
    streams = service.getServiceNamed("streams")
    yield streams.engines.probe()
    port = reactor.listenTCP(0, make_site(streams, config, **site_options), interface="127.0.0.1")
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


# Awaiting what the proxy does, instead of polling for it


def _outcome(d: Deferred) -> Deferred:
    """
    A new L{Deferred} with C{d}'s outcome, leaving C{d}'s result to its
    other callbacks.
    """
    copy = Deferred()

    def fire(result):
        if isinstance(result, Failure):
            copy.errback(result)
        else:
            copy.callback(None)
        return result

    d.addBoth(fire)
    return copy


@attrs.define(eq=False)
class StreamStops:
    """
    The stops of a registry's streams, to await rather than poll for a
    stream to be gone.  A stream that stops by itself (its grace over, its
    start failed, its reconnections exhausted) offers nothing to await until
    it begins to stop, which it does by leaving its registry: so the
    registry's C{removeService}, through which every stream then passes, is
    wrapped to note the stream's stop L{Deferred} (its C{stopService}
    result, the same however often it is asked for).
    """

    registry: object
    _stops: dict = attrs.field(factory=dict)
    _noted: set = attrs.field(factory=set)

    @classmethod
    def watch(cls, registry) -> "StreamStops":
        """
        Watch C{registry} from now on (the same watcher however often it is
        asked for): before its first stream, so that no stop goes unseen.
        """
        stops = _WATCHING.get(registry)
        if stops is not None:
            return stops
        stops = _WATCHING[registry] = cls(registry)
        remove = registry.removeService

        def removeService(service):
            removed = remove(service)
            stops._begun(service)
            return removed

        registry.removeService = removeService
        return stops

    @classmethod
    def of(cls, registry) -> "StreamStops":
        """
        The watcher of C{registry}, which must have been watched from the
        start.
        """
        assert registry in _WATCHING, "watch the registry before its first stream"
        return _WATCHING[registry]

    def _done(self, stream) -> Deferred:
        if stream not in self._stops:
            self._stops[stream] = Deferred()
        return self._stops[stream]

    def _begun(self, stream) -> None:
        if stream in self._noted:
            return
        self._noted.add(stream)
        _outcome(stream.stopService()).chainDeferred(self._done(stream))

    def stopped(self, stream, timeout: float = 10.0) -> Deferred:
        """
        Fire once C{stream} has stopped, which it may not have begun to do
        yet: everything its stop does (its players' bodies ended, and for an
        owner the engine told to stop and the keys deleted) is done.
        """
        return _outcome(self._done(stream)).addTimeout(timeout, reactor)

    def all_stopped(self, timeout: float = 10.0) -> Deferred:
        """
        Fire once every stream that began to stop has stopped, and every
        stream the registry has now as well.
        """
        streams = set(self._stops) | set(self.registry.streams.values())
        d = DeferredList(
            [_outcome(self._done(s)) for s in streams], fireOnOneErrback=True, consumeErrors=True
        )
        return d.addCallback(lambda _: None).addTimeout(timeout, reactor)


async def watched(start, engines, **options) -> RunningProxy:
    """
    A proxy started with C{start} (the C{proxy_factory} fixture), whose
    streams' stops are watched from the start (L{StreamStops.of}).
    """
    proxy = await start(engines, **options)
    StreamStops.watch(proxy.registry)
    return proxy


#: The watcher of each watched registry.
_WATCHING: "weakref.WeakKeyDictionary[object, StreamStops]" = weakref.WeakKeyDictionary()


def gone(producer, timeout: float = 10.0) -> Deferred:
    """
    Fire once the proxy has seen the connection of C{producer}'s player
    close, and the player has left its stream.  twisted.web tells of a lost
    connection through the request's C{notifyFinish}, in the order it was
    asked for; the route asked first, and cancels the player's stream then,
    so by the time this fires the player is detached.
    """
    request = producer.request
    if request.channel is None:
        return succeed(None)
    return request.notifyFinish().addErrback(lambda _: None).addTimeout(timeout, reactor)


def work_done(owner, timeout: float = 10.0) -> Deferred:
    """
    Fire once the background work C{owner} (a stream, or the stream
    registry) has under way has ended: a stream's metadata writes, its
    players' registrations, the stop commands of the engine sessions it
    replaced; the registry's engine probes.
    """
    return _outcome(owner.tasks.settle()).addTimeout(timeout, reactor)


def sent_by(*running: RunningEngine) -> int:
    """
    The bytes the engines' live sessions wrote to their playback
    connections so far: no player can have had more of them, so whatever a
    player gets past this many bytes came from a later session.
    """
    return sum(session.bytes_sent for r in running for session in r.engine.sessions.values())
