"""
The send path to players, on real sockets of 127.0.0.1.

A chunk goes straight to a socket that has room.  A player whose socket is
full is paused with at most the rest of one chunk queued, and resumes from
the window when it reads again, while the transport keeps Twisted's own
C{bufferSize}: what a player sends is read in normal-sized reads.  The
request's C{sentLength} counts the body, for the access log.  And a Twisted
without the internals the direct send reads gets the public C{write}, with
one warning.

The server is twisted.web's own (L{Site}, its HTTP channel, L{Request}, the
TCP transport) streaming a L{FanOut} that each test feeds itself, so that
every chunk and every pause is the test's doing.
"""

import socket
import uuid
from typing import Callable

import attrs
import pytest
import pytest_twisted
from twisted.internet import abstract, reactor, tcp
from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from acestream_proxy.stream import sendpath
from acestream_proxy.stream.fanout import FanOut
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.player import PlayerInfo, PlayerProducer
from acestream_proxy.stream.sendpath import FastPath, fast_path
from acestream_proxy.stream.window import Chunk, ChunkWindow
from acestream_proxy.testing.synthetic import verify

from .fakes import packets
from .rawplayer import RawPlayer
from .support import eventually

#: Packets in a chunk: about 9 KB, which a socket with room takes whole.
SMALL = 50

#: Packets in a chunk as large as the engine's reads make them (64 KiB).
LARGE = 348

#: Twisted's own C{bufferSize}, which a player's transport must keep.
DEFAULT_BUFFER_SIZE = abstract.FileDescriptor.bufferSize


def queued(transport) -> int:
    """
    Bytes a connection holds in this process's memory, waiting for the
    kernel to take them (Twisted's private counters: a measurement only).
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


# --- a raw player -------------------------------------------------------------


# --- the server -----------------------------------------------------------------


@attrs.define(eq=False)
class Served:
    """
    A twisted.web server whose every request is a player of one L{FanOut}.

    @ivar before_start: called with each request before its producer
        starts, to watch its transport.
    @ivar reads: for each connection, the size of every read its HTTP
        channel was given.
    """

    follower: FanOut
    port: object = None
    before_start: Callable = lambda request: None
    players: list = attrs.field(factory=list)
    clients: list = attrs.field(factory=list)
    reads: list = attrs.field(factory=list)
    next_index: int = 1

    def publish(self, count: int = 1, size: int = SMALL) -> list[Chunk]:
        chunks = []
        for _ in range(count):
            index = self.next_index
            chunk = Chunk.make(index, packets(index * size, size), added_at=0.0)
            self.follower.deliver(chunk)
            self.next_index += 1
            chunks.append(chunk)
        return chunks

    def connect(self, version: bytes = b"HTTP/1.1", rcvbuf: int = 1 << 20) -> RawPlayer:
        """
        A player with a receive buffer of C{rcvbuf}: a small one fills
        within a few chunks once the player stops reading.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port.getHost().port))
        sock.setblocking(False)
        client = RawPlayer(request=b"GET /stream %s\r\nHost: 127.0.0.1\r\n\r\n" % version)
        reactor.adoptStreamConnection(
            sock.fileno(), socket.AF_INET, Factory.forProtocol(lambda: client)
        )
        sock.close()
        self.clients.append(client)
        return client

    async def player(self, client: RawPlayer) -> PlayerProducer:
        """
        The producer of C{client}, once its response headers arrived.
        """
        await eventually(lambda: client.head is not None, what="the response headers")
        assert client.head.startswith(b"HTTP/1."), client.head
        port = client.transport.getHost().port
        (player,) = [p for p in self.players if p.request.getClientAddress().port == port]
        return player


class _Stream(Resource):
    isLeaf = True

    def __init__(self, served: Served) -> None:
        super().__init__()
        self.served = served

    def render_GET(self, request):
        served = self.served
        served.before_start(request)
        producer = PlayerProducer(
            PlayerInfo(uuid.uuid4().hex, "k", "127.0.0.1", "raw", 0.0),
            served.follower,
            request,
            lambda producer: None,
        )
        producer.done.addCallback(lambda _: request.finish())
        served.players.append(producer)
        producer.start()
        return NOT_DONE_YET


class _Site(Site):
    def __init__(self, served: Served) -> None:
        super().__init__(_Stream(served))
        self.served = served

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        reads = []
        self.served.reads.append(reads)
        received = channel.dataReceived

        def dataReceived(data: bytes) -> None:
            reads.append(len(data))
            received(data)

        channel.dataReceived = dataReceived
        return channel


def serving(fanout: FanOut):
    """
    A fixture's body: C{fanout}'s players served on a free port of
    127.0.0.1, their connections dropped and the port closed after the test.
    """
    served = Served(fanout)
    served.port = reactor.listenTCP(0, _Site(served), interface="127.0.0.1")
    yield served
    for client in served.clients:
        if client.transport is not None:
            client.transport.abortConnection()
    pytest_twisted.blockon(served.port.stopListening())


@pytest.fixture
def served():
    yield from serving(FanOut(ChunkWindow(10, ttl=60), join_chunks=3))


@pytest.fixture
def fresh_probe():
    """
    A process that has not yet probed its Twisted, before and after.
    """
    fast_path.cache_clear()
    yield
    fast_path.cache_clear()


@pytest.fixture
def sendpath_events():
    """
    Every log event of the send path, while the test runs.
    """
    events = []

    def observe(event) -> None:
        if event.get("log_namespace", "").startswith(sendpath.__name__):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def spy_on_sends(calls: list) -> Callable:
    """
    A C{before_start} that records, for each chunk written to a player's
    transport, C{("direct", data)} when it went to the socket at once,
    C{("batch", buffers)} when several went in one system call, and
    C{("queued", data)} when it went to the transport's C{write}.  Sends by the transport itself, flushing its
    queue, are not recorded.
    """

    def watch(request) -> None:
        transport = request.transport
        flushing = []
        do_write, write = transport.doWrite, transport.write

        def doWrite():
            flushing.append(True)
            try:
                return do_write()
            finally:
                flushing.pop()

        def queue(data):
            calls.append(("queued", data))
            return write(data)

        transport.doWrite, transport.write = doWrite, queue
        transport.socket = _SpiedSocket(transport.socket, calls, flushing)

    return watch


class _SpiedSocket:
    """
    A socket whose sends are recorded unless its transport is flushing.
    """

    def __init__(self, sock, calls: list, flushing: list) -> None:
        self._sock, self._calls, self._flushing = sock, calls, flushing

    def send(self, data):
        if not self._flushing:
            self._calls.append(("direct", data))
        return self._sock.send(data)

    def sendmsg(self, buffers):
        self._calls.append(("batch", list(buffers)))
        return self._sock.sendmsg(buffers)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def whole(body: bytes, allowed_jumps: int = 0):
    report = verify(body, allowed_jumps=allowed_jumps)
    assert report.ok, report.describe()
    return report


# --- the probe ------------------------------------------------------------------


def test_this_twisted_has_what_the_direct_send_reads(fresh_probe, sendpath_events):
    assert fast_path() == FastPath(None)
    assert fast_path().on
    assert sendpath_events == []


def _without_temp_data_len(patch) -> None:
    init = abstract.FileDescriptor.__init__

    def renamed(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._queuedLength = self.__dict__.pop("_tempDataLen")

    patch.setattr(abstract.FileDescriptor, "__init__", renamed)


def _socket_renamed(patch) -> None:
    init = tcp.Connection.__init__

    def renamed(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._sock = self.__dict__.pop("socket")

    patch.setattr(tcp.Connection, "__init__", renamed)


#: Twisteds that differ from the one the direct send was written against:
#: how to simulate each, and what the warning then says.
DIFFERENT_TWISTEDS = {
    "no dataBuffer": (
        lambda patch: patch.delattr(abstract.FileDescriptor, "dataBuffer"),
        "has no dataBuffer",
    ),
    "no _tempDataLen": (_without_temp_data_len, "has no _tempDataLen"),
    "dataBuffer a list": (
        lambda patch: patch.setattr(abstract.FileDescriptor, "dataBuffer", []),
        "not empty bytes",
    ),
    "socket kept elsewhere": (_socket_renamed, "has no socket"),
    "write queues elsewhere": (
        lambda patch: patch.setattr(abstract.FileDescriptor, "write", lambda self, data: None),
        "left _tempDataLen at 0",
    ),
}


@pytest.mark.parametrize("simulate, why", DIFFERENT_TWISTEDS.values(), ids=DIFFERENT_TWISTEDS)
def test_a_different_twisted_turns_the_direct_send_off_with_one_warning(
    fresh_probe, sendpath_events, monkeypatch, simulate, why
):
    with monkeypatch.context() as patch:
        simulate(patch)
        assert not fast_path().on
        assert not fast_path().on
    assert why in fast_path().reason
    (event,) = sendpath_events
    assert event["log_level"] == LogLevel.warn
    assert event["reason"] == fast_path().reason


@pytest_twisted.ensureDeferred
async def test_without_the_internals_chunks_go_through_write_with_one_warning(
    served, fresh_probe, sendpath_events, monkeypatch
):
    """
    A Twisted whose connections have no C{dataBuffer}: every chunk goes
    through the transport's public C{write} and still arrives whole, and
    however many players start, one warning says why.
    """
    with monkeypatch.context() as patch:
        patch.delattr(abstract.FileDescriptor, "dataBuffer")
        assert not fast_path().on
    calls = []
    served.before_start = spy_on_sends(calls)
    clients = [served.connect() for _ in range(3)]
    players = [await served.player(client) for client in clients]
    chunks = []
    for _ in range(10):
        chunks += served.publish()
        await eventually(
            lambda: all(len(c.body()) == len(chunks) * SMALL * PACKET_SIZE for c in clients),
            what="the chunk at every player",
        )
    assert [kind for kind, _ in calls] == ["queued"] * (3 * len(chunks))
    for client, player in zip(clients, players):
        whole(client.body())
        assert player.skips == 0

    (event,) = sendpath_events
    assert event["log_level"] == LogLevel.warn
    assert "dataBuffer" in event["reason"]
    assert fast_path().reason == event["reason"]


# --- the direct send ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chunks_go_straight_to_a_socket_with_room(served):
    calls = []
    served.before_start = spy_on_sends(calls)
    client = served.connect()
    player = await served.player(client)
    transport = player.request.transport
    assert queued(transport) == 0
    chunks = []
    for _ in range(20):
        chunks += served.publish()
        await eventually(
            lambda: len(client.body()) == len(chunks) * SMALL * PACKET_SIZE,
            what="the chunk at the player",
        )
    assert [kind for kind, _ in calls] == ["direct"] * len(chunks)
    assert all(data is chunk.framed for (_, data), chunk in zip(calls, chunks))
    assert not player.paused and served.follower.live_count == 1
    whole(client.body())


@pytest_twisted.ensureDeferred
async def test_a_player_behind_catches_up_in_one_system_call(served):
    """
    A player that starts behind the live edge (or resumes there) is sent
    the chunks it lacks together, in one C{sendmsg}, then goes live.  The
    first one waits behind the response headers, queued in the transport.
    """
    window = served.publish(3)
    calls = []
    served.before_start = spy_on_sends(calls)
    client = served.connect()
    player = await served.player(client)
    await eventually(lambda: len(calls) == 2, what="the window sent")
    framed = [chunk.framed for chunk in window]
    assert calls == [("queued", framed[0]), ("batch", framed[1:])]
    live = served.publish()
    await eventually(
        lambda: len(client.body()) == 4 * SMALL * PACKET_SIZE, what="the live chunk"
    )
    assert calls[2:] == [("direct", live[0].framed)]
    assert served.follower.live_count == 1 and player.bytes_sent == 4 * SMALL * PACKET_SIZE
    whole(client.body())


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
@pytest_twisted.ensureDeferred
async def test_request_sent_length_counts_the_body(served, version):
    """
    The access log's byte count (the request's C{sentLength}, read when the
    request ends) is the body sent, though chunks bypass the request's
    C{write}: those a player catches up on from the window, and those it
    gets live.
    """
    served.publish(3)
    client = served.connect(version)
    player = await served.player(client)
    for _ in range(5):
        served.publish()
        await eventually(lambda: len(client.body()) == player.bytes_sent, what="the chunk")
    assert player.bytes_sent == 8 * SMALL * PACKET_SIZE
    whole(client.body())
    # The access log is written as the request ends.
    player.finish()
    assert player.request.sentLength == player.bytes_sent


# --- pausing on queued bytes ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_full_socket_pauses_the_player_with_one_chunk_queued(served):
    """
    A player that stops reading is paused as soon as the kernel does not
    take a whole chunk, with the transport's C{bufferSize} left at Twisted's
    own: we hold at most the rest of that chunk, however many more chunks
    come.  When it reads again, it resumes: it skips to the live edge, on a
    packet boundary.
    """
    client = served.connect(rcvbuf=4096)
    player = await served.player(client)
    transport = player.request.transport
    client.transport.pauseProducing()
    sent = []
    while not player.paused:
        assert len(sent) < 1000, "the player's socket never filled"
        sent += served.publish(size=LARGE)
    assert transport.bufferSize == DEFAULT_BUFFER_SIZE
    held = queued(transport)
    assert 0 < held <= len(sent[-1].framed)
    assert served.follower.live_count == 0

    served.publish(30, size=LARGE)
    assert player.paused
    assert queued(transport) == held
    assert player.position < served.follower.window.first_index

    client.transport.resumeProducing()
    await eventually(lambda: not player.paused and player.skips == 1, what="the player resumed")
    assert served.follower.live_count == 1
    last = served.publish(3, size=LARGE)[-1]

    def at_live_edge():
        report = verify(client.body(), allowed_jumps=1)
        return report if report.last_seq == (last.index + 1) * LARGE - 1 else None

    report = await eventually(at_live_edge, what="the live edge at the player")
    assert report.ok, report.describe()
    assert len(report.gaps) == 1


@pytest_twisted.ensureDeferred
async def test_bytes_a_player_sends_while_it_plays_are_read_in_normal_reads(served):
    """
    32 KB a player sends after its request (the HTTP channel buffers what
    follows a request until the response is done, and stops reading past
    16 KB) are read in a few reads, not one read per byte, and the player
    streams on.
    """
    client = served.connect()
    player = await served.player(client)
    (reads,) = served.reads
    before = len(reads)
    client.transport.write(b"x" * 32768)
    await eventually(lambda: sum(reads[before:]) > 16384, what="the bytes read")
    assert len(reads) - before < 100, reads[before:]
    assert player.request.transport.bufferSize == DEFAULT_BUFFER_SIZE
    for _ in range(5):
        served.publish()
        await eventually(lambda: len(client.body()) == player.bytes_sent, what="the chunk")
    assert not client.closed
    whole(client.body())
