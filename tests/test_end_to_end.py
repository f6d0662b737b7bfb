"""
The daemons as an operator runs them: C{twistd -n acesim} and C{twistd -n
aceproxy} (and C{python -m acestream_proxy.testing.demo}) as separate processes,
spawned on the test's own reactor so that it keeps serving the players while
the daemons run.  Every wait is for an event (a log line, bytes, an exit)
with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing.engine import content_tag
from acestream_proxy.testing.synthetic import verify

from .support import HASHES, Player, check_whole_packets

ROOT = Path(__file__).resolve().parent.parent
KEY = HASHES[0]
BITRATE = 4_000_000
ONE_SECOND_BYTES = BITRATE // 8
#: Data packets the engine sends per second of broadcast.
PACKETS_PER_SECOND = BITRATE / (PACKET_SIZE * 8)

#: C{twistd} run by this very interpreter: C{python -m twisted} is C{twist},
#: which has neither C{-n} nor C{--pidfile}.
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; "
    "sys.argv[0] = 'twistd'; run()"
)
#: The simulated engine's own start-up line, with its actual port.
SIM_LISTENING = r"listening on http://127\.0\.0\.1:(\d+)/"
#: Logged by Twisted's TCP port for the proxy's C{Site} once it listens; the
#: proxy logs no address of its own, and this is the only listener it has.
PROXY_LISTENING = r"\bSite starting on (\d+)\b"
DEMO_URL = r"(http://127\.0\.0\.1:\d+/ace/getstream\?id=[0-9a-f]{40})"


# --- processes -------------------------------------------------------------


@attrs.define(eq=False)
class _LineWaiter:
    """A test waiting for a line that matches C{pattern}."""

    pattern: re.Pattern
    deferred: Deferred


@attrs.define(eq=False)
class Daemon(ProcessProtocol):
    """
    A child process whose output is kept line by line, so that a test can
    wait for the line announcing what it needs (a port, a URL) and show the
    whole output when something goes wrong.
    """

    name: str
    lines: list[str] = attrs.field(factory=list)
    exit_code: int | None = None
    exit_signal: int | None = None
    ended: bool = False
    _partial: dict[int, bytes] = attrs.field(factory=dict)
    _line_waiters: list[_LineWaiter] = attrs.field(factory=list)
    _exit_waiters: list[Deferred] = attrs.field(factory=list)

    # ProcessProtocol

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *complete, self._partial[childFD] = buffered.split(b"\n")
        for raw in complete:
            self._line(raw)

    def processEnded(self, reason) -> None:
        for rest in self._partial.values():
            if rest:
                self._line(rest)
        self._partial.clear()
        self.ended = True
        self.exit_code = reason.value.exitCode
        self.exit_signal = reason.value.signal
        self._fail_line_waiters()
        exits, self._exit_waiters = self._exit_waiters, []
        for d in exits:
            d.callback(self.exit_code)

    def _fail_line_waiters(self) -> None:
        """A line still awaited will never come: say so at once, with the output."""
        waiters, self._line_waiters = self._line_waiters, []
        for waiter in waiters:
            waiter.deferred.errback(self._no_such_line(waiter.pattern.pattern))

    def _no_such_line(self, pattern: str) -> AssertionError:
        return AssertionError(
            f"{self.describe_end()} without a line matching {pattern!r}\n{self.output()}"
        )

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.lines.append(line)
        for waiter in self._line_waiters[:]:
            match = waiter.pattern.search(line)
            if match:
                self._line_waiters.remove(waiter)
                waiter.deferred.callback(match)

    # For tests

    def output(self) -> str:
        return f"--- output of {self.name} ---\n" + "\n".join(self.lines)

    def describe_end(self) -> str:
        if self.exit_signal is not None:
            return f"{self.name} was killed by signal {self.exit_signal}"
        return f"{self.name} exited with code {self.exit_code}"

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> Deferred:
        """
        Fire with the match of the first line (already printed or to come)
        matching C{pattern}; fail with the output if none comes in time.
        """
        regex = re.compile(pattern)
        for line in self.lines:
            match = regex.search(line)
            if match:
                return succeed(match)
        if self.ended:
            return fail(self._no_such_line(pattern))
        waiter = _LineWaiter(regex, Deferred(lambda d: self._line_waiters.remove(waiter)))
        self._line_waiters.append(waiter)
        return waiter.deferred.addTimeout(
            timeout, reactor, onTimeoutCancel=self._timed_out(f"a line matching {pattern!r}")
        )

    def wait_exit(self, timeout: float = 10.0) -> Deferred:
        """Fire with the exit code once the process has ended."""
        if self.ended:
            return succeed(self.exit_code)
        d = Deferred(lambda d: self._exit_waiters.remove(d))
        self._exit_waiters.append(d)
        return d.addTimeout(timeout, reactor, onTimeoutCancel=self._timed_out("its exit"))

    def _timed_out(self, what: str):
        def timed_out(result, timeout):
            raise AssertionError(
                f"{self.name}: waited {timeout}s in vain for {what}\n{self.output()}"
            )

        return timed_out

    def stopped_cleanly(self) -> bool:
        """
        Whether a signal stopped the process the orderly way.  twistd, once
        its reactor has shut down after SIGTERM or SIGINT, kills itself with
        that same signal (so that its parent sees why it ended): an orderly
        stop of a twistd daemon is that signal after twistd's last log line,
        not exit code 0.
        """
        if self.exit_code == 0:
            return True
        return (
            self.exit_signal in (signal.SIGTERM, signal.SIGINT)
            and any(line.endswith("Server Shut Down.") for line in self.lines)
            and not any("Traceback" in line for line in self.lines)
        )

    def send_signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    def kill(self) -> None:
        """Make sure the process is gone, whatever state the test left it in."""
        try:
            self.transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass


def child_environment() -> dict[str, str]:
    """
    The repository root first on the path: twistd finds the plugins in its
    C{twisted/plugins} only there, since the editable install does not
    register them.
    """
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.fixture
def spawn(tmp_path):
    """
    Start processes that are killed at teardown even when the test failed,
    so that no daemon outlives its test holding a port.
    """
    started: list[Daemon] = []

    def start(
        name: str, *arguments: str, executable: str = sys.executable, argv0=None, childFDs=None
    ) -> Daemon:
        """
        Run C{executable} (this interpreter unless told) with C{arguments},
        after C{argv0} (by default, C{[executable]}); C{childFDs} as
        C{spawnProcess} takes them.
        """
        daemon = Daemon(name)
        argv = [*(argv0 or [executable]), *arguments]
        reactor.spawnProcess(
            daemon,
            executable,
            argv,
            env=child_environment(),
            path=str(tmp_path),
            childFDs=childFDs,
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if not daemon.ended:
            daemon.kill()
            pytest_twisted.blockon(daemon.wait_exit())


def twistd(spawn, name: str, *arguments: str) -> Daemon:
    return spawn(name, "-c", TWISTD, "-n", "--pidfile=", *arguments)


async def start_sim_daemon(spawn) -> tuple[Daemon, str]:
    sim = twistd(
        spawn,
        "acesim",
        "acesim",
        "--port",
        "tcp:0:interface=127.0.0.1",
        "--bitrate",
        str(BITRATE),
    )
    match = await sim.wait_for_line(SIM_LISTENING)
    return sim, f"http://127.0.0.1:{match.group(1)}"


async def start_proxy_daemon(spawn, engine_url: str, *arguments: str) -> tuple[Daemon, str]:
    proxy = twistd(
        spawn,
        "aceproxy",
        "aceproxy",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--engine",
        engine_url,
        *arguments,
    )
    match = await proxy.wait_for_line(PROXY_LISTENING)
    return proxy, f"http://127.0.0.1:{match.group(1)}"


async def get_json(url: str):
    response = await treq.get(url).addTimeout(5, reactor)
    assert response.code == 200, f"{url}: HTTP {response.code}"
    return await treq.json_content(response)


def check_stream(data: bytes, key: str = KEY):
    """
    A finished body: whole packets of C{key}'s broadcast, in order (a body
    still arriving is judged with L{check_whole_packets}).
    """
    report = verify(data, content_tag=content_tag(key))
    assert report.ok, report.describe()
    return report


# --- the daemons -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_players_share_one_engine_session_until_sigterm(spawn):
    """
    Two players of one broadcast cost the engine one session; SIGTERM ends
    both players' bodies, stops that session on the engine and lets the
    daemon end in an orderly way within 10 s.
    """
    sim, sim_url = await start_sim_daemon(spawn)
    proxy, proxy_url = await start_proxy_daemon(spawn, sim_url)
    stream_url = f"{proxy_url}/ace/getstream?id={KEY}"

    players = [await Player.open(stream_url) for _ in range(2)]
    assert [p.response.code for p in players] == [200, 200]
    for player in players:
        await player.wait_bytes(int(ONE_SECOND_BYTES * 1.05))
        report = check_whole_packets(player.data, KEY)
        assert report.data_packets >= PACKETS_PER_SECOND, report.describe()

    streams = await get_json(f"{proxy_url}/streams")
    assert [(s["key"], s["players"]) for s in streams] == [(KEY, 2)], streams
    state = await get_json(f"{sim_url}/sim/state")
    assert len(state["sessions"]) == 1, state
    assert state["getstream_calls"] == [["id", KEY]], state
    (session_id,) = state["sessions"]

    proxy.send_signal("TERM")
    exited = proxy.wait_exit(10)
    ends = [await player.ended.addTimeout(10, reactor) for player in players]
    await exited
    assert proxy.stopped_cleanly(), proxy.describe_end() + "\n" + proxy.output()
    # Whether the proxy finished the bodies cleanly: asserted, since its
    # shutdown promises players a clean end (see StreamRegistry.stopService).
    assert ends == [True, True], proxy.output()
    for player in players:
        check_stream(bytes(player.data))
    state = await get_json(f"{sim_url}/sim/state")
    assert state["stopped"] == [session_id], state
    assert state["sessions"] == {}, state

    sim.send_signal("TERM")
    await sim.wait_exit(10)
    assert sim.stopped_cleanly(), sim.describe_end() + "\n" + sim.output()


@pytest_twisted.ensureDeferred
async def test_unknown_config_key_is_one_line_without_traceback(spawn, tmp_path):
    """
    A misspelt key stops twistd before anything starts, with the one line
    an operator needs rather than a traceback to dig through.
    """
    config = tmp_path / "aceproxy.toml"
    config.write_text('listen = "tcp:0:interface=127.0.0.1"\ncolour = "blue"\n')
    proxy = twistd(spawn, "aceproxy", "aceproxy", "--config", str(config))
    code = await proxy.wait_exit(10)
    output = proxy.output()
    assert code not in (0, None), output
    assert "Traceback" not in output, output
    naming = [line for line in proxy.lines if "colour" in line]
    assert len(naming) == 1, output
    assert naming[0].endswith("unknown key: colour"), output


@pytest_twisted.ensureDeferred
async def test_help_lists_the_options(spawn):
    """The plugin's options reach twistd's help, so operators can find them."""
    proxy = twistd(spawn, "aceproxy", "aceproxy", "--help")
    assert await proxy.wait_exit(10) == 0, proxy.output()
    output = proxy.output()
    for option in ("--listen=", "--engine=", "--forwarded-engine=", "--config="):
        assert option in output, output


# --- what the daemon loads --------------------------------------------------

#: The compiled part of the TLS stack (cryptography's bindings, OpenSSL
#: linked in), mapped into a process once it imports pyOpenSSL.
TLS_LIBRARY = re.compile(r"/cryptography/hazmat/bindings/[^/]*\.so$|/_openssl[^/]*\.so$", re.M)


def tls_mapped(daemon: Daemon) -> list[str]:
    maps = Path(f"/proc/{daemon.transport.pid}/maps").read_text()
    return sorted(set(TLS_LIBRARY.findall(maps)))


async def refresh_plugin_cache(spawn) -> None:
    """
    Bring twistd's plugin cache up to date first, as an installation does:
    with a stale one, twistd imports every plugin module, Twisted's own
    among them, and those import the TLS stack before the daemon decides.
    """
    refresh = spawn(
        "plugin cache",
        "-c",
        "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))",
    )
    assert await refresh.wait_exit(30) == 0, refresh.output()


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps"
)


@needs_proc
@pytest_twisted.ensureDeferred
async def test_daemon_with_plain_http_urls_loads_no_tls(spawn):
    """
    With an http engine and the embedded store, the daemon never maps the
    TLS stack, and serves players all the same.
    """
    await refresh_plugin_cache(spawn)
    _, sim_url = await start_sim_daemon(spawn)
    proxy, proxy_url = await start_proxy_daemon(spawn, sim_url)
    player = await Player.open(f"{proxy_url}/ace/getstream?id={KEY}")
    assert player.response.code == 200, proxy.output()
    await player.wait_bytes(ONE_SECOND_BYTES // 4)
    check_whole_packets(player.data, KEY)
    assert tls_mapped(proxy) == [], proxy.output()
    player.disconnect()


@needs_proc
@pytest.mark.parametrize(
    ("engine", "arguments"),
    [
        ("https://127.0.0.1:9", ()),
        ("http://127.0.0.1:9", ("--redis", "rediss://127.0.0.1:9")),
    ],
    ids=["https engine", "rediss store"],
)
@pytest_twisted.ensureDeferred
async def test_daemon_that_may_use_tls_loads_it(spawn, engine, arguments):
    """
    An https engine or a Redis store (here, neither reachable) keeps TLS
    available: the daemon has it loaded once it listens.
    """
    await refresh_plugin_cache(spawn)
    proxy, proxy_url = await start_proxy_daemon(spawn, engine, *arguments)
    assert (await treq.get(proxy_url + "/health").addTimeout(5, reactor)).code in (200, 503)
    assert tls_mapped(proxy) != [], proxy.output()


# --- make demo ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_demo_serves_its_url_and_stops_on_ctrl_c(spawn, tmp_path):
    """
    The demo prints a URL that plays, with the actual port when asked for
    any free one, and Ctrl-C ends its player cleanly and exits 0.  Its
    broadcast is made where C{--media} says (here, not in the user's cache).
    """
    media = tmp_path / "demo.ts"
    demo = spawn(
        "demo",
        "-m",
        "acestream_proxy.testing.demo",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--engine-port",
        "0",
        "--media",
        str(media),
    )
    url = (await demo.wait_for_line(DEMO_URL)).group(1)
    assert media.stat().st_size > 1_000_000
    key = url.rsplit("=", 1)[1]
    player = await Player.open(url)
    assert player.response.code == 200, demo.output()
    await player.wait_bytes(200_000)
    check_whole_packets(player.data, key)

    demo.send_signal("INT")
    assert await player.ended.addTimeout(10, reactor) is True, demo.output()
    assert await demo.wait_exit(10) == 0, demo.describe_end() + "\n" + demo.output()
    assert any("demo stopped" in line for line in demo.lines), demo.output()


@pytest_twisted.ensureDeferred
async def test_systemd_socket_activation(spawn, tmp_path):
    """
    C{--listen systemd:domain=INET:index=0} serves players on the socket
    systemd hands over (as fd 3, with LISTEN_FDS, LISTEN_FDNAMES and
    LISTEN_PID), as C{aceproxy.socket} does.
    """
    _, engine_url = await start_sim_daemon(spawn)
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(50)
    port = listening.getsockname()[1]
    command = (
        'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=aceproxy.socket exec "$0" -c "$1" '
        '-n --pidfile= aceproxy '
        '--listen systemd:domain=INET:index=0 --engine "$2"'
    )
    daemon = Daemon("aceproxy (socket-activated)")
    argv = ["/bin/sh", "-c", command, sys.executable, TWISTD, engine_url]
    reactor.spawnProcess(
        daemon,
        "/bin/sh",
        argv,
        env=child_environment(),
        path=str(tmp_path),
        childFDs={0: "w", 1: "r", 2: "r", 3: listening.fileno()},
    )
    listening.close()
    try:
        await daemon.wait_for_line(PROXY_LISTENING)
        # Healthy once its engine has passed the first probe.
        await daemon.wait_for_line(r"engine \S+ is healthy")
        url = f"http://127.0.0.1:{port}"
        health = await get_json(url + "/health")
        assert health["status"] == "ok"
        player = await Player.open(f"{url}/ace/getstream?id={KEY}")
        await player.wait_bytes(ONE_SECOND_BYTES // 4)
        check_whole_packets(player.data, KEY)
        player.disconnect()
    finally:
        if not daemon.ended:
            daemon.kill()
            await daemon.wait_exit()
