"""
Fan-out benchmark: one stream, many players, one table.

Every row of the table is measured in the same run, so the rows compare:
aceproxy with its embedded store, aceproxy with a Redis store and two
workers, a bare Twisted relay with no buffer (bench/relay.py, the floor),
and any other proxy given as --peer NAME=COMMAND. Each runs at each number
of players, the sizes in turn (every target at one size, then the next), so
that drift on the machine hits all rows alike.

A run is: the simulated engine (twistd acesim, new for each run, so it
counts the run's own engine sessions) and the target on 127.0.0.1; the
first player starts the stream, the others join it within the join window,
spread over the target's ports; after the settle time the target's CPU is
measured for the duration. The players run in one or two client processes
of their own (bench/players.py), which check every packet.

    python bench/fanout.py                          # the whole table (make bench)
    python bench/fanout.py --players 1,20 --duration 5 --targets aceproxy,relay
    python bench/fanout.py --peer 'acexy=ENGINE_URL={engine} LISTEN={port} ... bash run.sh'
    python bench/fanout.py --players 300 --targets aceproxy --json out.json
    python bench/fanout.py -- --config small-window.toml   # extra aceproxy arguments

A peer's COMMAND runs with sh -c; {engine} is replaced with the engine's
base URL and {port} with the port to listen on (127.0.0.1), also given as
ENGINE_URL, LISTEN and PORT in its environment. It must serve
/ace/getstream?id=<40 hex> there within 20 s.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import targets
from table import LEGEND, format_table, slopes
from targets import (
    BUILT_IN,
    Processes,
    cpu_seconds,
    free_port,
    peak_rss_mb,
    twistd,
    wait_http,
)

KEY = "5e" * 20
LATENCY_SAMPLES = 50_000  # packets sampled per client process and run, about


def plan(players: int, ports: list[int], clients: int, args) -> list[dict]:
    """
    The client processes' specs: the first player at once, the others
    spread over the join window, over the ports and over the clients.
    """
    specs = [{"key": KEY, "players": []} for _ in range(clients)]
    step = args.join_window / max(1, players - 1)
    for n in range(players):
        at = 0.0 if n == 0 else 0.5 + n * step
        specs[(n // len(ports)) % clients]["players"].append([n, ports[n % len(ports)], at])
    measure_at = 0.5 + args.join_window + args.settle
    packets = args.bitrate / (188 * 8) * args.duration
    for spec in specs:
        spec.update(
            measure_at=measure_at,
            end_at=measure_at + args.duration,
            stride=math.ceil(len(spec["players"]) * packets / LATENCY_SAMPLES),
        )
    return specs


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def run_one(name: str, players: int, args) -> dict:
    """One target at one size, in processes of its own."""
    workdir = tempfile.mkdtemp(prefix="aceproxy-bench-")
    processes = Processes(os.path.join(workdir, "processes.log"))
    target = targets.make(name, processes, args, players)
    clients = []
    try:
        engine_port = free_port()
        engine = processes.start(
            twistd("acesim", "--port", f"tcp:{engine_port}:interface=127.0.0.1",
                   "--bitrate", str(args.bitrate), "--batch-ms", str(args.batch_ms)),
            env=dict(os.environ, PYTHONPATH=targets.ROOT),
        )
        engine_url = f"http://127.0.0.1:{engine_port}"
        wait_http(f"{engine_url}/webui/api/service?method=get_version", process=engine)
        ports = target.start(engine_url)
        specs = plan(players, ports, min(args.clients, players), args)
        for spec in specs:
            client = subprocess.Popen(
                [sys.executable, os.path.join(targets.BENCH, "players.py")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            clients.append(client)
            client.stdin.write(json.dumps(spec) + "\n")
            client.stdin.flush()
        for client in clients:
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError("a client process did not start")
        t0 = time.monotonic() + 0.1
        for client in clients:
            client.stdin.write(f"{t0!r}\n")
            client.stdin.flush()

        sleep_until(t0 + specs[0]["measure_at"])
        cpu0 = {pid: cpu_seconds(pid) for pid in target.pids()}
        counters0 = target.counters()
        # Every player has joined by now: who serves how many.
        served = target.players_by_process() if hasattr(target, "players_by_process") else {}
        started = time.monotonic()
        sleep_until(t0 + specs[0]["end_at"])
        pids = target.pids()
        per_process = {pid: cpu_seconds(pid) - cpu0.get(pid, 0.0) for pid in pids}
        cpu = sum(per_process.values())
        elapsed = time.monotonic() - started

        rss = [peak_rss_mb(pid) for pid in pids]
        counters1 = target.counters()
        with urllib.request.urlopen(f"{engine_url}/sim/state", timeout=10) as response:
            sim = json.load(response)
        outcomes = []
        for client in clients:
            out, _ = client.communicate(timeout=30)
            outcomes.append(json.loads(out))
        result = summarise(name, players, args, outcomes, cpu, elapsed, rss, sim)
        result["processes"] = len(pids)
        if len(served) > 1:
            result["workers"] = [
                {"players": served[pid], "cpu_per_player_minute":
                 round(per_process[pid] / (served[pid] * elapsed / 60), 5) if served[pid] else None}
                for pid in pids
            ]
        if counters0:
            chunks = counters1["chunks"] - counters0["chunks"]
            result.update(
                redis_commands_per_chunk=round((counters1["redis_commands"] - counters0["redis_commands"])
                                               / max(1, chunks), 2),
                redis_cpu_percent=round(100 * (counters1["redis_cpu_s"] - counters0["redis_cpu_s"]) / elapsed, 1),
                redis_used_memory_mb=counters1["redis_used_memory_mb"],
            )
        return result
    except Exception as e:  # noqa: BLE001 -- a failed run is a row of the table
        return {"target": name, "players": players, "error": f"{type(e).__name__}: {e}",
                "log": processes.log_tail()}
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
            client.wait()
        processes.stop()
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def summarise(name, players, args, outcomes, cpu, elapsed, rss, sim) -> dict:
    latencies = sorted(x for o in outcomes for x in o["latencies"])
    first_bytes = {index: t for o in outcomes for index, t in o["first_bytes"]}
    joiners = [t for index, t in first_bytes.items() if index != 0]
    first = first_bytes.get(0)
    first_byte = statistics.median(joiners) if players > 1 and joiners else first if players == 1 else None
    problems = {}
    for outcome in outcomes:
        for kind, (count, index, words) in outcome["problems"].items():
            seen = problems.setdefault(kind, [0, index, words])
            seen[0] += count

    def percentile(p: float):
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))], 4) if latencies else None

    return {
        "target": name,
        "players": players,
        "duration": round(elapsed, 2),
        "cpu_s": round(cpu, 3),
        "cpu_per_player_minute": round(cpu / (players * elapsed / 60), 5),
        "cpu_percent": round(100 * cpu / elapsed, 1),
        "peak_rss_mb": round(max(rss), 1) if rss else None,
        "peak_rss_sum_mb": round(sum(rss), 1),
        "latency_p50": percentile(0.5),
        "latency_p99": percentile(0.99),
        "latency_samples": len(latencies),
        "first_byte_p50_ms": None if first_byte is None else round(first_byte * 1000, 2),
        "first_byte_first_player_ms": None if first is None else round(first * 1000, 2),
        "gap_free": sum(o["gap_free"] for o in outcomes),
        "connected": sum(o["connected"] for o in outcomes),
        "connect_failures": sum(o["failed"] for o in outcomes),
        "misaligned_starts": sum(o["misaligned_starts"] for o in outcomes),
        "problems": problems,
        "received_mb": round(sum(o["bytes"] for o in outcomes) / 2**20, 1),
        "engine_sessions": len(sim["getstream_calls"]),
        "engine_sessions_open": len(sim["sessions"]),
        "client_processes": len(outcomes),
        "client_cpu_percent": [round(o["cpu_percent"], 1) for o in outcomes],
    }


def machine() -> dict:
    import twisted

    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
    }


def notes(results: list[dict]) -> list[str]:
    """What the table does not show: misaligned starts, problems, the client's load."""
    lines = []
    for r in results:
        if r.get("error"):
            lines.append(f"{r['target']} at {r['players']}: {r['error']}")
            continue
        if r["misaligned_starts"]:
            lines.append(f"{r['target']} at {r['players']}: {r['misaligned_starts']} players started"
                         " mid-packet (resynchronised, tolerated)")
        if r["gap_free"] < r["players"]:
            problems = "; ".join(f"{count} x {kind} (first: player {index}, {words})"
                                 for kind, (count, index, words) in list(r["problems"].items())[:3])
            lines.append(f"{r['target']} at {r['players']}: not gap-free: {problems}")
    measured = [r for r in results if not r.get("error")]
    if measured:
        busiest = max(measured, key=lambda r: max(r["client_cpu_percent"]))
        lines.append(
            f"bench client: at most {max(busiest['client_cpu_percent']):.0f}% of a core per client process"
            f" ({busiest['target']} at {busiest['players']}, {busiest['client_processes']} process(es))"
        )
    return lines


def report(results: list[dict], info: dict, args) -> str:
    lines = [
        (f"Machine: {info['cpus']} CPUs, {info['cpu_model']}, Python {info['python']},"
         f" Twisted {info['twisted']}, {info['date']}"),
        (f"One {args.bitrate / 1e6:g} Mbit/s stream in {args.batch_ms:g} ms batches; players join within"
         f" {args.join_window:g} s, {args.settle:g} s settle, {args.duration:g} s measured per run."),
        "",
        format_table(results),
        "",
        LEGEND,
    ]
    if "aceproxy-redis" in args.rows:
        lines.append(f"aceproxy-redis: {args.redis_workers} workers sharing one port (--reuse-port),"
                     " the kernel spreading players over them; its redis-server is not counted.")
        for r in results:
            if r.get("workers"):
                each = ", ".join(f"{w['cpu_per_player_minute']} ({w['players']} players)" for w in r["workers"])
                lines.append(f"  at {r['players']}: CPU-s/player-min per worker: {each}")
    slope = slopes(results)
    if slope:
        lines += ["", *slope]
    extra = notes(results)
    if extra:
        lines += ["", *extra]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--players", default="1,100,300,1000", help="numbers of players, one run each per target")
    parser.add_argument("--targets", help=f"rows, in order (default: {','.join(BUILT_IN)}, then every peer)")
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND",
                        help="another proxy to measure (repeatable); see above")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument("--join-window", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last join before measuring")
    parser.add_argument("--bitrate", type=int, default=4_000_000)
    parser.add_argument("--batch-ms", type=float, default=50)
    parser.add_argument("--redis-workers", type=int, default=2, help="aceproxy workers of the aceproxy-redis row")
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes the players are split over, each with its own reactor")
    parser.add_argument("--json", metavar="FILE", help="write every run's raw result there")
    parser.add_argument("proxy_args", nargs="*", help="extra aceproxy arguments (after --)")
    args = parser.parse_args(argv)
    args.sizes = [int(n) for n in args.players.split(",")]
    if min(args.sizes) < 1 or args.clients < 1:
        parser.error("--players and --clients must be positive")
    args.peers = {}
    for peer in args.peer:
        name, sep, command = peer.partition("=")
        if not sep or not name or not command:
            parser.error(f"--peer wants NAME=COMMAND, not {peer!r}")
        if name in BUILT_IN or name in args.peers:
            parser.error(f"--peer {name!r}: that name is taken")
        args.peers[name] = command
    args.rows = args.targets.split(",") if args.targets else [*BUILT_IN, *args.peers]
    for name in args.rows:
        if name not in BUILT_IN and name not in args.peers:
            parser.error(f"unknown target {name!r}: one of {', '.join([*BUILT_IN, *args.peers])}")
    return args


def main() -> None:
    args = parse_args()
    info = machine()
    runs = [(players, name) for players in args.sizes for name in args.rows]
    results = []
    for number, (players, name) in enumerate(runs, 1):
        print(f"[{number}/{len(runs)}] {name}, {players} players", file=sys.stderr, flush=True)
        results.append(run_one(name, players, args))
        if results[-1].get("error"):
            print(f"  failed: {results[-1]['error']}\n{results[-1]['log']}", file=sys.stderr, flush=True)
    print(report(results, info, args), flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("peer",)}
        with open(args.json, "w") as f:
            json.dump({"machine": info, "settings": settings, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
