"""
Fan-out benchmark: one stream, many players.

Starts the simulated engine and the proxy as separate twistd processes on
127.0.0.1 (with --redis, a redis-server too and one or two proxy workers
sharing it), connects N players within the join window (spread over the
workers), measures for the given duration and prints the figures of
DESIGN.md's performance bar:

- proxy CPU seconds per player-minute (utime+stime of the proxy process),
- engine -> player latency p50/p99 (each packet carries the time the engine
  sent it; measured on the newest packet of every read),
- time to first byte for players joining the running stream, and whether
  that byte starts a packet,
- the proxy's peak RSS,
- players served gap-free (every data packet in order, none missing or
  repeated, every packet whole), and the engine sessions opened;
- with --redis: Redis commands per chunk, and Redis memory for the stream
  against bitrate x window.

    python bench/fanout.py --players 300 --duration 60
    python bench/fanout.py --redis --workers 2 --players 1,10,100,500
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


def twistd(*args: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "-l", "/dev/null", *args]


def redis_info(redis, section: str) -> dict:
    raw = redis("INFO", section).decode()
    return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)


def redis_commands(redis) -> int:
    """
    Commands Redis has run, all kinds together, INFO itself left out.
    """
    total = 0
    for name, value in redis_info(redis, "commandstats").items():
        if name.startswith("cmdstat_") and name != "cmdstat_info":
            total += int(value.split(",")[0].split("=")[1])
    return total


def run(args) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    engine_port = free_port()
    proxy_ports = [free_port() for _ in range(args.workers)]
    processes = []
    redis_server = redis = None
    store_args = []
    if args.redis:
        sys.path.insert(0, root)
        from tests.redis_server import RedisServer

        redis_server = RedisServer().start()
        redis = redis_server.client()
        store_args = ["--redis", redis_server.url]
    engine = subprocess.Popen(
        twistd("acesim", "--port", f"tcp:{engine_port}:interface=127.0.0.1",
               "--bitrate", str(args.bitrate), "--batch-ms", str(args.batch_ms)),
        env=env,
    )
    processes.append(engine)
    proxies = [
        subprocess.Popen(
            twistd("aceproxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                   "--engine", f"http://127.0.0.1:{engine_port}", *store_args, *args.proxy_args),
            env=env,
        )
        for port in proxy_ports
    ]
    processes += proxies
    try:
        wait_http(f"http://127.0.0.1:{engine_port}/webui/api/service?method=get_version")
        for port in proxy_ports:
            wait_http(f"http://127.0.0.1:{port}/health")
        bench = Bench(args)
        result = {}
        key = KEY

        def start():
            # The first player starts the stream; the rest join it within
            # the join window, evenly spread, alternating between workers.
            bench.connect(proxy_ports[0])
            step = args.join_window / max(1, args.players - 1)
            for n in range(1, args.players):
                port = proxy_ports[n % len(proxy_ports)]
                reactor.callLater(0.5 + n * step, bench.connect, port)
            reactor.callLater(0.5 + args.join_window + args.settle, measure)

        def measure():
            bench.measuring = True
            result["cpu0"] = [cpu_seconds(p.pid) for p in proxies]
            result["t0"] = time.monotonic()
            if redis is not None:
                result["commands0"] = redis_commands(redis)
                result["index0"] = int(redis("GET", f"ace_proxy:stream:{key}:buffer:index") or 0)
            reactor.callLater(args.duration, finish)

        def finish():
            bench.measuring = False
            cpu = sum(cpu_seconds(p.pid) for p in proxies) - sum(result.pop("cpu0"))
            elapsed = time.monotonic() - result.pop("t0")
            with urllib.request.urlopen(f"http://127.0.0.1:{engine_port}/sim/state") as r:
                sim = json.load(r)
            lat = sorted(bench.latencies)
            joined = [t for t, _ in bench.first_bytes[1:]]
            result.update(
                players=args.players,
                workers=args.workers,
                store="redis" if redis is not None else "memory",
                bitrate=args.bitrate,
                duration=round(elapsed, 1),
                cpu_per_player_minute=round(cpu / (args.players * elapsed / 60), 4),
                proxy_cpu_percent=round(100 * cpu / elapsed, 1),
                latency_p50=round(lat[len(lat) // 2], 4) if lat else None,
                latency_p99=round(lat[int(len(lat) * 0.99)], 4) if lat else None,
                first_byte_p50=round(statistics.median(joined), 4) if joined else None,
                first_byte_on_packet_boundary=all(ok for _, ok in bench.first_bytes),
                peak_rss_mb=max(round(peak_rss_mb(p.pid), 1) for p in proxies),
                gap_free_players=sum(1 for p in bench.players if not p.bad and p.bytes),
                engine_sessions=len(sim.get("sessions", {})),
            )
            if redis is not None:
                chunks = int(redis("GET", f"ace_proxy:stream:{key}:buffer:index") or 0) - result.pop("index0")
                commands = redis_commands(redis) - result.pop("commands0")
                held = sum(
                    redis("STRLEN", name) for name in redis("KEYS", f"ace_proxy:stream:{key}:buffer:chunk:*")
                )
                result.update(
                    redis_commands_per_chunk=round(commands / max(1, chunks), 2),
                    redis_used_memory_mb=round(int(redis_info(redis, "memory")["used_memory"]) / 2**20, 1),
                    redis_chunk_bytes_mb=round(held / 2**20, 1),
                    bitrate_x_window_mb=round(args.bitrate / 8 * min(args.window_seconds, elapsed + args.settle + args.join_window + 0.5) / 2**20, 1),
                )
            for player in bench.players:
                player.transport.loseConnection()
            reactor.callLater(0.2, reactor.stop)

        reactor.callWhenRunning(start)
        reactor.run()
        return result
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        if redis_server is not None:
            redis.close()
            redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--players", default="300", help="a number, or several separated by commas (one run each)")
    parser.add_argument("--bitrate", type=int, default=4_000_000)
    parser.add_argument("--batch-ms", type=float, default=50)
    parser.add_argument("--join-window", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last join before measuring")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--redis", action="store_true", help="use a Redis store (starts redis-server)")
    parser.add_argument("--workers", type=int, default=1, help="proxy processes sharing the stream (needs --redis)")
    parser.add_argument(
        "--window-seconds", type=float, default=50.0,
        help="the buffer window in seconds (buffer_chunks x batch, capped by chunk_ttl), for the memory comparison",
    )
    parser.add_argument("proxy_args", nargs="*", help="extra aceproxy arguments (after --)")
    args = parser.parse_args()
    if args.workers > 1 and not args.redis:
        parser.error("--workers above 1 needs --redis")
    counts = [int(n) for n in args.players.split(",")]
    if len(counts) == 1:
        args.players = counts[0]
        print(json.dumps(run(args), indent=2))
        return
    # A reactor runs once per process: one child process per run.
    for count in counts:
        argv = [a for a in sys.argv[1:]]
        at = argv.index("--players")
        argv[at + 1] = str(count)
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
        print(json.dumps(json.loads(out.stdout)), flush=True)


if __name__ == "__main__":
    main()
