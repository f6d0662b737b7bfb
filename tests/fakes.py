"""
In-memory stand-ins for the network edges of the proxy, for tests whose
subject is timer or fan-out logic driven by L{task.Clock}: a request whose
transport is a L{StringTransport}, and an engine API whose playback body is
fed by the test.
"""

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from acestream_proxy.config import Tuning
from acestream_proxy.engine.api import Playback
from acestream_proxy.engine.registry import Engine, EngineRegistry
from acestream_proxy.store.memory import MemoryStore
from acestream_proxy.stream.registry import StreamRegistry
from acestream_proxy.testing.synthetic import data_packets


@attrs.define(eq=False)
class FakeRequest:
    """
    Just what L{PlayerProducer} and L{StreamRegistry.attach} use of a request.
    """

    chunked: bool = True
    transport: StringTransport = attrs.field(factory=StringTransport)
    producer: object = None
    headers_written: bool = False

    def write(self, data: bytes) -> None:
        assert data == b"", "bodies go straight to the transport"
        self.headers_written = True

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def getClientAddress(self):
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHeader(self, name: bytes):
        return b"test-player/1.0" if name.lower() == b"user-agent" else None


@attrs.define(eq=False)
class FakeEngineAPI:
    """
    An engine API that always opens sessions; the test feeds each playback
    body through C{readers}.
    """

    healthy: bool = True
    getstreams: list = attrs.field(factory=list)
    stops: list = attrs.field(factory=list)
    readers: list = attrs.field(factory=list)
    _awaited: list = attrs.field(factory=list)

    async def getstream(self, engine, key, param="infohash"):
        self.getstreams.append((engine.id, param, key))
        sid = f"session-{len(self.getstreams)}"
        base = f"{engine.url}/ace"
        return Playback(f"{base}/r/{key}/{sid}", f"{base}/stat/{key}/{sid}", f"{base}/cmd/{key}/{sid}", sid, 1)

    async def open_playback(self, engine, playback):
        return _FakeResponse(self)

    async def stop(self, engine, playback):
        self.stops.append(playback.playback_session_id)

    async def version(self, engine):
        if not self.healthy:
            raise RuntimeError("probe failed")
        return "3.1.5"

    def reader(self, n: int) -> Deferred:
        """
        Fire with the protocol reading the C{n}th playback body (from 0)
        once the proxy has opened it: on a store with I/O of its own (Redis)
        a stream reaches its engine only after the store has answered, which
        the test awaits this way rather than polling C{readers}.
        """
        d = Deferred()
        self._awaited.append((n, d))
        self._opened()
        return d

    def _opened(self) -> None:
        awaited, self._awaited = self._awaited, []
        for n, d in awaited:
            if n < len(self.readers):
                d.callback(self.readers[n])
            else:
                self._awaited.append((n, d))


@attrs.define(eq=False)
class _FakeResponse:
    api: FakeEngineAPI

    def deliverBody(self, protocol) -> None:
        protocol.makeConnection(StringTransport())
        self.api.readers.append(protocol)
        self.api._opened()


def packets(first_seq: int, count: int) -> bytes:
    return data_packets(first_seq, count, b"\x01\x01\x01\x01", 0.0)


def make_server(clock, api=None, engines=None, store=None, **tuning) -> StreamRegistry:
    """
    A proxy on C{clock} with the fake engine API: on the embedded store,
    or on C{store} when given one (made with the same C{tuning}).  Unless
    C{tuning} says otherwise, each engine read is a chunk of its own
    (C{chunk_bytes=0}), so that a test's reads and chunks correspond.
    """
    api = api or FakeEngineAPI()
    tuning = Tuning(**{"chunk_bytes": 0} | tuning)
    engines = engines or [Engine("engine-a", "http://127.0.0.1:6878", "127.0.0.1", 6878)]
    registry = EngineRegistry(engines, api)
    if store is None:
        store = MemoryStore(
            clock,
            tuning.buffer_chunks,
            tuning.chunk_ttl,
            "worker-1",
            buffer_bytes=tuning.buffer_bytes,
            buffer_seconds=tuning.buffer_seconds,
        )
    return StreamRegistry(store, registry, api, clock, tuning, "worker-1")
