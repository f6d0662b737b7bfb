"""
Fan-out benchmark: one stream, many players.

Starts the simulated engine and the proxy as separate twistd processes on
127.0.0.1, connects N players within the join window, measures for the
given duration and prints the figures of DESIGN.md's performance bar:

- proxy CPU seconds per player-minute (utime+stime of the proxy process),
- engine -> player latency p50/p99 (each packet carries the time the engine
  sent it; measured on the newest packet of every read),
- time to first byte for players joining the running stream, and whether
  that byte starts a packet,
- the proxy's peak RSS,
- players served gap-free (every data packet in order, none missing or
  repeated, every packet whole), and the engine sessions opened.

    python bench/fanout.py --players 300 --duration 60
"""

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request

from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Protocol

KEY = "5e" * 20
PACKET = 188
DATA_PID_BYTES = b"\x41\x00"  # payload_unit_start + PID 0x100
SEQ_OFFSET = 4 + 9 + 4 + 4  # TS header, PES header, magic, content tag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                response.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class BenchPlayer(Protocol):
    """
    Reads one chunked TS body, checking continuity per read with slicing
    (C speed) instead of per packet in Python.
    """

    def __init__(self, bench: "Bench") -> None:
        self.bench = bench
        self.head = bytearray()
        self.in_body = False
        self.pending = bytearray()  # undecoded chunked bytes
        self.packets = bytearray()  # decoded bytes not yet whole packets
        self.chunk_left = 0
        self.expect_seq = None
        self.bad = False
        self.first_byte_at = None
        self.bytes = 0

    def connectionMade(self) -> None:
        self.sent_at = time.monotonic()
        self.transport.write(b"GET /ace/getstream?id=%s HTTP/1.1\r\nHost: bench\r\n\r\n" % KEY.encode())

    def dataReceived(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 200"):
                self.bad = True
                self.transport.loseConnection()
                return
            self.in_body = True
            data = bytes(self.head[end + 4 :])
        self.pending += data
        self._dechunk()

    def _dechunk(self) -> None:
        pending = self.pending
        pos = 0
        while pos < len(pending):
            if self.chunk_left == 0:
                end = pending.find(b"\r\n", pos)
                if end < 0:
                    break
                line = bytes(pending[pos:end])
                if not line:  # CRLF that closes the previous chunk
                    pos = end + 2
                    continue
                self.chunk_left = int(line, 16)
                pos = end + 2
                if self.chunk_left == 0:
                    break
            take = min(self.chunk_left, len(pending) - pos)
            self.packets += pending[pos : pos + take]
            self.chunk_left -= take
            pos += take
        del pending[:pos]
        self._check()

    def _check(self) -> None:
        packets = self.packets
        whole = len(packets) - len(packets) % PACKET
        if not whole:
            return
        now = time.monotonic()
        if self.first_byte_at is None:
            self.first_byte_at = now
            self.bench.first_bytes.append((now - self.sent_at, packets[0] == 0x47))
        view = bytes(packets[:whole])
        del packets[:whole]
        self.bytes += whole
        count = whole // PACKET
        if view[::PACKET] != b"\x47" * count:
            self.bad = True
            return
        # Data packets are those whose PID bytes say 0x100.
        pids = [view[i + 1 : i + 3] for i in range(0, whole, PACKET)]
        data_at = [i * PACKET for i, pid in enumerate(pids) if pid == DATA_PID_BYTES]
        if not data_at:
            return
        first = struct.unpack_from(">Q", view, data_at[0] + SEQ_OFFSET)[0]
        last, sent = struct.unpack_from(">Qd", view, data_at[-1] + SEQ_OFFSET)
        if self.expect_seq is not None and first != self.expect_seq:
            self.bad = True
        if last - first + 1 != len(data_at):
            self.bad = True
        self.expect_seq = last + 1
        if self.bench.measuring:
            self.bench.latencies.append(time.time() - sent)

    def connectionLost(self, reason) -> None:
        self.bench.closed += 1


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.first_bytes = []
        self.latencies = []
        self.players = []
        self.measuring = False
        self.closed = 0

    def connect(self, port: int) -> None:
        factory = ClientFactory()
        factory.protocol = lambda: self._new_player()
        reactor.connectTCP("127.0.0.1", port, factory)

    def _new_player(self) -> BenchPlayer:
        player = BenchPlayer(self)
        self.players.append(player)
        return player


def run(args) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    engine_port, proxy_port = free_port(), free_port()
    twistd = [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "-l", "/dev/null"]
    engine = subprocess.Popen(
        twistd + ["acesim", "--port", f"tcp:{engine_port}:interface=127.0.0.1",
                  "--bitrate", str(args.bitrate), "--batch-ms", str(args.batch_ms)],
        env=env,
    )
    proxy = subprocess.Popen(
        twistd + ["aceproxy", "--listen", f"tcp:{proxy_port}:interface=127.0.0.1",
                  "--engine", f"http://127.0.0.1:{engine_port}"] + args.proxy_args,
        env=env,
    )
    try:
        wait_http(f"http://127.0.0.1:{engine_port}/webui/api/service?method=get_version")
        wait_http(f"http://127.0.0.1:{proxy_port}/health")
        bench = Bench(args)
        result = {}

        def start():
            # The first player starts the stream; the rest join it within
            # the join window, evenly spread.
            bench.connect(proxy_port)
            step = args.join_window / max(1, args.players - 1)
            for n in range(1, args.players):
                reactor.callLater(0.5 + n * step, bench.connect, proxy_port)
            reactor.callLater(0.5 + args.join_window + args.settle, measure)

        def measure():
            bench.measuring = True
            result["cpu0"] = cpu_seconds(proxy.pid)
            result["t0"] = time.monotonic()
            reactor.callLater(args.duration, finish)

        def finish():
            bench.measuring = False
            cpu = cpu_seconds(proxy.pid) - result["cpu0"]
            elapsed = time.monotonic() - result["t0"]
            with urllib.request.urlopen(f"http://127.0.0.1:{engine_port}/sim/state") as r:
                sim = json.load(r)
            lat = sorted(bench.latencies)
            joined = [t for t, _ in bench.first_bytes[1:]]
            result.update(
                players=args.players,
                bitrate=args.bitrate,
                duration=round(elapsed, 1),
                cpu_per_player_minute=round(cpu / (args.players * elapsed / 60), 4),
                proxy_cpu_percent=round(100 * cpu / elapsed, 1),
                latency_p50=round(lat[len(lat) // 2], 4) if lat else None,
                latency_p99=round(lat[int(len(lat) * 0.99)], 4) if lat else None,
                first_byte_p50=round(statistics.median(joined), 4) if joined else None,
                first_byte_on_packet_boundary=all(ok for _, ok in bench.first_bytes),
                peak_rss_mb=round(peak_rss_mb(proxy.pid), 1),
                gap_free_players=sum(1 for p in bench.players if not p.bad and p.bytes),
                engine_sessions=len(sim.get("sessions", {})),
            )
            for player in bench.players:
                player.transport.loseConnection()
            reactor.callLater(0.2, reactor.stop)

        reactor.callWhenRunning(start)
        reactor.run()
        return result
    finally:
        for process in (proxy, engine):
            process.send_signal(signal.SIGTERM)
        for process in (proxy, engine):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--players", type=int, default=300)
    parser.add_argument("--bitrate", type=int, default=4_000_000)
    parser.add_argument("--batch-ms", type=float, default=50)
    parser.add_argument("--join-window", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last join before measuring")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("proxy_args", nargs="*", help="extra aceproxy arguments (after --)")
    args = parser.parse_args()
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
