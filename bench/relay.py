"""
The floor of the fan-out benchmark: a bare Twisted relay with no buffer.

The first player of an id makes it ask the engine for a session
(C{/ace/getstream?format=json}) and GET its playback URL; every piece of
body received from the engine is then framed once as a chunk and written to
every connected player with C{transport.write}. No window, no checks, no
backpressure, no reconnection: a late joiner starts at the next piece
received, wherever in a packet that falls, and the engine session is never
stopped. What aceproxy costs above this row is the price of its features.

    python bench/relay.py --engine http://127.0.0.1:6878 --port 8000
"""

import argparse
import resource
import sys
from urllib.parse import parse_qs, urlsplit

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nTransfer-Encoding: chunked\r\n\r\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Stream:
    """One engine session and the players of its id."""

    def __init__(self, relay: "Relay", key: str) -> None:
        self.players = set()
        self.done = self._run(relay, key)
        self.done.addErrback(lambda f: print(f"relay: {key}: {f.getErrorMessage()}", file=sys.stderr))
        self.done.addBoth(lambda _: self._end(relay, key))

    @inlineCallbacks
    def _run(self, relay: "Relay", key: str):
        answer = yield treq.json_content(
            (yield treq.get(f"{relay.engine}/ace/getstream?format=json&id={key}"))
        )
        playback = yield treq.get(answer["response"]["playback_url"], unbuffered=True)
        yield treq.collect(playback, self.relay)

    def relay(self, piece: bytes) -> None:
        framed = b"%x\r\n%s\r\n" % (len(piece), piece)
        for player in self.players:
            player.transport.write(framed)

    def _end(self, relay: "Relay", key: str) -> None:
        relay.streams.pop(key, None)
        for player in list(self.players):
            player.transport.loseConnection()


class Player(Protocol):
    """Reads one request head, then only receives."""

    stream = None

    def connectionMade(self) -> None:
        self.request = b""

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None:
            return
        self.request += data
        if b"\r\n\r\n" not in self.request:
            return
        url = urlsplit(self.request.split(b" ", 2)[1].decode("latin-1"))
        query = parse_qs(url.query)
        key = (query.get("id") or query.get("infohash") or [""])[0]
        if url.path != "/ace/getstream" or not key:
            self.transport.write(NOT_FOUND)
            self.transport.loseConnection()
            return
        streams = self.factory.streams
        if key not in streams:
            streams[key] = Stream(self.factory, key)
        self.stream = streams[key]
        self.transport.write(HEAD)
        self.stream.players.add(self)

    def connectionLost(self, reason) -> None:
        if self.stream is not None:
            self.stream.players.discard(self)


class Relay(Factory):
    protocol = Player

    def __init__(self, engine: str) -> None:
        self.engine = engine.rstrip("/")
        self.streams = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="http://127.0.0.1:6878", help="the engine's base URL")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on, on 127.0.0.1")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from twisted.internet import reactor

    reactor.listenTCP(args.port, Relay(args.engine), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
