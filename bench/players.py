"""
The benchmark's players: one client process with its own reactor that opens
its share of the players, checks every byte they get and reports in JSON.

The client must stay cheap at 1000 players of a 4 Mbit/s stream (500 MB/s in
all), so each read costs a fixed number of Python operations: the chunked
framing is cut with memoryview slices, and a read's whole packets are
checked with strided slices (C speed): every packet starts with 0x47, the
data packets (the simulated engine's PID 0x100) are counted from the byte
after it, and only the first and last of them are parsed, which must carry
consecutive sequence numbers following the previous read's. Latency (now
less the send time the engine wrote into the packet) is sampled from about
every Nth packet the process receives, at random, so that packets held back
in a peer's buffer weigh as much as the newest of a read.

A player whose body does not start on a packet boundary (a relay that joins
it mid-stream) is resynchronised to the first 0x47 that starts three
packets in a row, and counted as a misaligned start.

Run by fanout.py: the spec comes as one JSON line on stdin, the process
answers "ready", then reads the start time (time.monotonic, shared by all
processes of the machine) and prints its result as one JSON line.
"""

import json
import os
import re
import resource
import struct
import sys
import time
from random import random

from twisted.internet.protocol import ClientFactory, Protocol

PACKET = 188
SYNC = 0x47
DATA_PID_HIGH = 0x41  # payload_unit_start + PID 0x100: the data packets
KNOWN_PID_HIGH = (0x40, 0x41, 0x50)  # PAT, data, PMT
SEQ_OFFSET = 4 + 9 + 4 + 4  # TS header, PES header, magic, content tag
SEQ = struct.Struct(">Q")
SENT_OFFSET = SEQ_OFFSET + 8  # the time the engine sent the packet
SENT = struct.Struct(">d")


class Player(Protocol):
    """One player's HTTP exchange and checks."""

    def __init__(self, client: "Client", index: int) -> None:
        self.client = client
        self.index = index
        self.head = b""
        self.in_body = False
        self.line = b""  # a chunk-size line cut by a read
        self.chunk_left = 0
        self.carry = b""  # a packet cut by a read, or bytes not yet synchronised
        self.synced = False
        self.misaligned = False
        self.expect = None  # the next data packet's sequence number
        self.problem = None  # why the player is not gap-free
        self.sent_at = None
        self.first_byte = None  # seconds from request to first body byte
        self.bytes = 0
        self.ended = False

    def connectionMade(self) -> None:
        self.sent_at = time.monotonic()
        self.transport.write(
            b"GET /ace/getstream?id=%s HTTP/1.1\r\nHost: bench\r\n\r\n" % self.client.key
        )

    def dataReceived(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head.split(b"\r\n", 1)[0]
            if status.split(b" ", 2)[1:2] != [b"200"]:
                self.problem = "status " + status.decode("latin-1")
                self.transport.loseConnection()
                return
            if b"chunked" not in self.head[:end].lower():
                self.problem = "not chunked"
                self.transport.loseConnection()
                return
            self.in_body = True
            data = self.head[end + 4 :]
            self.head = b""
        # Cut the chunk framing off: one slice per chunk, not per packet.
        pieces = []
        view = memoryview(data)
        size = len(data)
        pos = 0
        left = self.chunk_left
        while pos < size:
            if left:
                end = min(size, pos + left)
                pieces.append(view[pos:end])
                left -= end - pos
                pos = end
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self.line += data[pos:]
                break
            line = (self.line + data[pos:eol]).strip()
            self.line = b""
            pos = eol + 1
            if line:  # else the CRLF that closes a chunk
                left = int(line.split(b";", 1)[0], 16)
                if not left:
                    self.ended = True
                    break
        self.chunk_left = left
        if pieces:
            self._check(pieces)

    def _check(self, pieces: list) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic() - self.sent_at
        body = b"".join([self.carry, *pieces]) if self.carry or len(pieces) > 1 else bytes(pieces[0])
        self.bytes += len(body) - len(self.carry)
        if self.problem is not None:
            self.carry = b""
            return
        if not self.synced:
            if len(body) < 3 * PACKET:
                self.carry = body
                return
            start = self._sync(body)
            if start is None:
                self.problem = "no packet boundary"
                return
            self.synced = True
            self.misaligned = start != 0
            body = body[start:]
        whole = len(body) - len(body) % PACKET
        self.carry = body[whole:]
        if not whole:
            return
        count = whole // PACKET
        if body[0:whole:PACKET].count(SYNC) != count:
            self.problem = "lost packet alignment"
            return
        pids = body[1:whole:PACKET]
        data_count = pids.count(DATA_PID_HIGH)
        if not data_count:
            return
        first = SEQ.unpack_from(body, pids.find(DATA_PID_HIGH) * PACKET + SEQ_OFFSET)[0]
        last = SEQ.unpack_from(body, pids.rfind(DATA_PID_HIGH) * PACKET + SEQ_OFFSET)[0]
        if self.expect is not None and first != self.expect:
            self.problem = f"expected packet {self.expect}, got {first}"
        elif last - first + 1 != data_count:
            self.problem = f"{data_count} data packets numbered {first}..{last}"
        self.expect = last + 1
        client = self.client
        if client.measuring:
            # Sample about every stride-th packet the process receives: the
            # packets a read brings may have waited differently long.
            client.countdown -= count
            while client.countdown <= 0:
                at = pids.find(DATA_PID_HIGH, count + client.countdown - 1)
                if at >= 0:
                    client.latencies.append(time.time() - SENT.unpack_from(body, at * PACKET + SENT_OFFSET)[0])
                client.countdown += int(random() * 2 * client.stride) + 1

    @staticmethod
    def _sync(body: bytes):
        """Where the first of three whole packets in a row starts, if anywhere."""
        for start in range(PACKET):
            if (
                body[start] == SYNC
                and body[start + PACKET] == SYNC
                and body[start + 2 * PACKET] == SYNC
                and body[start + 1] in KNOWN_PID_HIGH
            ):
                return start
        return None

    def connectionLost(self, reason) -> None:
        if not self.client.finished and self.problem is None:
            self.problem = "connection lost" if not self.ended else "body ended"


class Client:
    """
    The players of one process: C{spec} says which to open (index, port,
    seconds after the start), when to measure and when to end.
    """

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.key = spec["key"].encode()
        self.stride = max(1, int(spec["stride"]))
        self.players = []
        self.failed = 0
        self.measuring = False
        self.finished = False
        self.countdown = 1
        self.latencies = []
        self.cpu = {}

    def run(self, t0: float) -> dict:
        from twisted.internet import reactor

        client = self

        class Factory(ClientFactory):
            def __init__(self, index: int) -> None:
                self.index = index

            def buildProtocol(self, addr):
                player = Player(client, self.index)
                client.players.append(player)
                return player

            def clientConnectionFailed(self, connector, reason):
                client.failed += 1

        def at(offset: float, call, *args) -> None:
            reactor.callLater(max(0.0, t0 + offset - time.monotonic()), call, *args)

        for index, port, offset in self.spec["players"]:
            at(offset, reactor.connectTCP, "127.0.0.1", port, Factory(index))
        at(self.spec["measure_at"], self._measure, True)
        at(self.spec["end_at"], self._measure, False)
        at(self.spec["end_at"] + 0.3, reactor.stop)
        reactor.run()
        return self.result()

    def _measure(self, start: bool) -> None:
        times = os.times()
        self.cpu["start" if start else "end"] = (times.user + times.system, time.monotonic())
        self.measuring = start
        if not start:
            self.finished = True
            for player in self.players:
                player.transport.loseConnection()

    def result(self) -> dict:
        (cpu0, t0), (cpu1, t1) = self.cpu["start"], self.cpu["end"]
        players = sorted(self.players, key=lambda p: p.index)
        problems = {}  # kind of problem: [players, the first player's index and words]
        for player in players:
            if player.problem is None and player.expect is None:
                player.problem = "no data packets"
            if player.problem is not None:
                seen = problems.setdefault(re.sub(r"\d+", "N", player.problem), [0, player.index, player.problem])
                seen[0] += 1
        return {
            "players": len(self.spec["players"]),
            "connected": len(players),
            "failed": self.failed,
            "gap_free": sum(1 for p in players if p.problem is None),
            "misaligned_starts": sum(1 for p in players if p.misaligned),
            "first_bytes": [[p.index, p.first_byte] for p in players if p.first_byte is not None],
            "latencies": self.latencies,
            "bytes": sum(p.bytes for p in players),
            "problems": problems,
            "cpu_s": cpu1 - cpu0,
            "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0),
        }


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from twisted.internet import reactor  # noqa: F401 -- installed before the start time

    print("ready", flush=True)
    t0 = float(sys.stdin.readline())
    print(json.dumps(Client(spec).run(t0)), flush=True)


if __name__ == "__main__":
    main()
