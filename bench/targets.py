"""
What the fan-out benchmark measures: the rows of its table, each a set of
processes started against the simulated engine's URL and stopped after the
run, with the means to read their CPU time and peak RSS from /proc.

- C{aceproxy}: one aceproxy process with the embedded store;
- C{aceproxy-redis}: two aceproxy workers sharing a Redis store (a
  redis-server of the run's own, not counted in the row);
- C{relay}: bench/relay.py, the floor;
- a peer: any shell command (C{--peer NAME=COMMAND}) serving
  C{/ace/getstream?id=} on the port it is given.

Every process is started in a session of its own; its whole process group
is signalled at the end.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime, with those of its children it has waited for."""
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICK


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_tree(root: int) -> list[int]:
    """C{root} and its living descendants, found by their parent pid."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                children.setdefault(int(_stat(int(name))[1]), []).append(int(name))
            except (OSError, IndexError):
                pass
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def wait_http(url: str, timeout: float = 20.0, process=None) -> None:
    """Until C{url} gives any HTTP answer, any status (or the process dies)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                response.read()
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"exited with status {process.returncode} before serving {url}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered {url} within {timeout:.0f} s")
            time.sleep(0.05)


def twistd(*args: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "-l", "-", *args]


class Processes:
    """Processes started in sessions of their own, their output in a log file."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.started = []

    def start(self, argv, **kwargs) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **kwargs,
            )
        self.started.append(process)
        return process

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        for process in self.started:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.started:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # whatever is left of its group
            process.wait()
        self.started = []


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class Target:
    """
    One row: L{start} returns the ports players are spread over; L{pids}
    the processes whose CPU and RSS the row counts.
    """

    name = ""
    description = ""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.main = []

    def start(self, engine_url: str) -> list[int]:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [p.pid for p in self.main]

    def counters(self) -> dict:
        """Figures of the target's own read at the start and end of the measurement."""
        return {}

    def stop(self) -> None:
        pass


class Aceproxy(Target):
    def __init__(self, processes: Processes, name: str, workers: int, redis: bool, proxy_args, players: int) -> None:
        super().__init__(processes)
        self.name = name
        self.workers = workers
        self.redis = redis
        self.proxy_args = list(proxy_args)
        self.players = players
        self.redis_server = self.client = None

    def config(self) -> list[str]:
        """
        A configuration that lets every player of the run in (the defaults
        cap a daemon at 2000 players), unless the command line brings its own.
        """
        if any(a in ("-c", "--config") or a.startswith("--config=") for a in self.proxy_args):
            return []
        path = os.path.join(os.path.dirname(self.processes.log_path), "aceproxy.toml")
        with open(path, "w") as f:
            f.write(f"[tuning]\nmax_clients_per_stream = {max(2000, self.players)}\n"
                    f"max_clients = {max(2000, self.players)}\n")
        return ["--config", path]

    def start(self, engine_url: str) -> list[int]:
        store = []
        if self.redis:
            sys.path.insert(0, ROOT)
            from tests.redis_server import RedisServer

            self.redis_server = RedisServer().start()
            self.client = self.redis_server.client()
            store = ["--redis", self.redis_server.url]
        # Several workers share one port, as on a host that runs one per
        # core: the kernel spreads the players over them (SO_REUSEPORT).
        self.port = free_port()
        shared = ["--reuse-port"] if self.workers > 1 else []
        env = dict(os.environ, PYTHONPATH=ROOT)
        for _ in range(self.workers):
            self.main.append(self.processes.start(
                twistd("aceproxy", "--listen", f"tcp:{self.port}:interface=127.0.0.1", *shared,
                       "--engine", engine_url, *store, *self.config(), *self.proxy_args),
                env=env,
            ))
        for process in self.main:
            wait_http(f"http://127.0.0.1:{self.port}/health", process=process)
        return [self.port]

    def players_by_process(self) -> dict[int, int]:
        """
        How many players each worker process serves: its established
        connections on the shared port.
        """
        established = set()
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == self.port and fields[3] == "01":
                    established.add(fields[9])
        counts = {}
        for process in self.main:
            fds = f"/proc/{process.pid}/fd"
            inodes = set()
            for fd in os.listdir(fds):
                try:
                    link = os.readlink(f"{fds}/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            counts[process.pid] = len(inodes & established)
        return counts

    def counters(self) -> dict:
        if self.client is None:
            return {}
        commands = 0
        for name, value in self._info("commandstats").items():
            if name.startswith("cmdstat_") and name != "cmdstat_info":
                commands += int(value.split(",")[0].split("=")[1])
        index = self.client("KEYS", "ace_proxy:stream:*:buffer:index")
        return {
            "redis_commands": commands,
            "chunks": sum(int(self.client("GET", key) or 0) for key in index),
            "redis_cpu_s": cpu_seconds(self.redis_server.process.pid),
            "redis_used_memory_mb": round(int(self._info("memory")["used_memory"]) / 2**20, 1),
        }

    def _info(self, section: str) -> dict:
        raw = self.client("INFO", section).decode()
        return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)

    def stop(self) -> None:
        if self.redis_server is not None:
            self.client.close()
            self.redis_server.stop()
            self.redis_server = None


class Relay(Target):
    name = "relay"

    def start(self, engine_url: str) -> list[int]:
        port = free_port()
        self.main.append(self.processes.start(
            [sys.executable, os.path.join(BENCH, "relay.py"), "--engine", engine_url, "--port", str(port)]
        ))
        wait_http(f"http://127.0.0.1:{port}/", process=self.main[0])
        return [port]


class Peer(Target):
    """
    C{COMMAND} is run with C{sh -c}, C{{engine}} and C{{port}} replaced (and
    given as ENGINE_URL, LISTEN and PORT in its environment). It is ready
    once its port accepts a connection; its CPU is that of its whole
    process tree.
    """

    def __init__(self, processes: Processes, name: str, command: str) -> None:
        super().__init__(processes)
        self.name = name
        self.command = command

    def start(self, engine_url: str) -> list[int]:
        port = free_port()
        command = self.command.replace("{engine}", engine_url).replace("{port}", str(port))
        env = dict(os.environ, ENGINE_URL=engine_url, LISTEN=str(port), PORT=str(port))
        process = self.processes.start(["sh", "-c", command], env=env)
        self.main.append(process)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return [port]
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"exited with status {process.returncode} before listening on {port}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listened on {port} within 20 s")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        return process_tree(self.main[0].pid)


BUILT_IN = ("aceproxy", "aceproxy-redis", "relay")


def make(name: str, processes: Processes, args, players: int) -> Target:
    if name == "aceproxy":
        return Aceproxy(processes, name, 1, False, args.proxy_args, players)
    if name == "aceproxy-redis":
        return Aceproxy(processes, name, args.redis_workers, True, args.proxy_args, players)
    if name == "relay":
        return Relay(processes)
    return Peer(processes, name, args.peers[name])
