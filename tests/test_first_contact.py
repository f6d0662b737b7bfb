"""
What a new user meets first: a daemon started before its engine, a
mistake in the configuration, a port already taken, and the log.

Engine health is driven on fakes where it is logic (one probe in flight,
what is logged), on real sockets where it is behaviour (a player served
as soon as the engine is up), and the process' own reports on real
C{twistd} subprocesses.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import globalLogPublisher
from twisted.web.server import Site

from acestream_proxy.config import EngineConfig
from acestream_proxy.engine.registry import Engine, EngineRegistry
from acestream_proxy.errors import EngineError

from .redis_server import RedisServer
from .support import HASHES, Player, start_engine
from .test_end_to_end import (  # noqa: F401 (spawn is a fixture)
    PROXY_LISTENING,
    SIM_LISTENING,
    TWISTD,
    child_environment,
    spawn,
    twistd,
)

KEY = HASHES[0]


# --- engine health, on fakes --------------------------------------------------


class PendingAPI:
    """An engine API whose probes wait for the test to answer them."""

    def __init__(self) -> None:
        self.calls: list[Deferred] = []

    def version(self, engine) -> Deferred:
        d = Deferred()
        self.calls.append(d)
        return d


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def said(events, namespace="acestream_proxy.engine.registry.EngineRegistry") -> list[str]:
    return [e["log_format"] for e in events if e.get("log_namespace") == namespace]


def configured(engine_id="engine-a") -> Engine:
    return Engine.from_config(EngineConfig(engine_id, "http://127.0.0.1:6878"))


def test_a_configured_engine_is_healthy_only_once_a_probe_passed():
    api = PendingAPI()
    engine = configured()
    registry = EngineRegistry([engine], api)
    assert (engine.healthy, registry.healthy(), registry.select({})) == (False, [], None)
    assert registry.problems() == "engine engine-a has not been probed yet"

    registry.probe()
    api.calls[0].errback(EngineError("engine engine-a failed get_version: ConnectError"))
    assert not engine.healthy
    assert registry.problems() == "engine engine-a failed get_version: ConnectError"

    registry.probe()
    api.calls[1].callback("3.1.5")
    assert (engine.healthy, engine.version, engine.problem) == (True, "3.1.5", None)
    assert registry.select({}) is engine
    assert registry.problems() == ""


def test_one_probe_in_flight_per_engine_whoever_asks():
    api = PendingAPI()
    a, b = configured("engine-a"), configured("engine-b")
    registry = EngineRegistry([a, b], api)
    waiting = [registry.probe_unhealthy() for _ in range(3)]
    waiting.append(registry.probe())
    assert len(api.calls) == 2
    assert not any(d.called for d in waiting)

    api.calls[0].callback("3.1.5")
    assert not any(d.called for d in waiting)
    api.calls[1].errback(EngineError("engine engine-b answered get_version with HTTP 500"))
    assert all(d.called for d in waiting)
    assert (a.healthy, b.healthy) == (True, False)

    # Only the unhealthy engine is probed again, and only once.
    again = [registry.probe_unhealthy(), registry.probe_unhealthy()]
    assert len(api.calls) == 3
    api.calls[2].callback("3.1.5")
    assert all(d.called for d in again) and b.healthy


def test_cancelling_every_waiter_cancels_the_probe_quietly(events):
    api = PendingAPI()
    engine = configured()
    registry = EngineRegistry([engine], api)
    first, second = registry.probe_unhealthy(), registry.probe_unhealthy()
    first.cancel()
    assert not api.calls[0].called
    second.cancel()
    assert api.calls[0].called
    for d in (first, second):
        [(succeeded, failure)] = d.result
        assert not succeeded and failure.check(CancelledError)
    assert said(events) == []
    # Nothing left in flight: the next request probes afresh.
    registry.probe_unhealthy()
    assert len(api.calls) == 2


def test_probe_results_are_logged_when_they_change(events):
    api = PendingAPI()
    engine = configured()
    registry = EngineRegistry([engine], api)
    for outcome in ["fail", "fail", "pass", "pass", "pass", "fail", "fail", "pass"]:
        registry.probe()
        if outcome == "pass":
            api.calls[-1].callback("3.1.5")
        else:
            api.calls[-1].errback(EngineError("engine engine-a failed get_version: ConnectError"))
    assert said(events) == [
        "engine {engine} failed its health probe: {why}",
        "engine {engine} is healthy again (version {version})",
        "engine {engine} failed its health probe: {why}",
        "engine {engine} is healthy again (version {version})",
    ]


def test_a_first_probe_that_passes_is_logged_once(events):
    api = PendingAPI()
    registry = EngineRegistry([configured()], api)
    for _ in range(3):
        registry.probe()
        api.calls[-1].callback("3.1.5")
    assert said(events) == ["engine {engine} is healthy (version {version})"]


# --- engine health, on real sockets -------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def answer(url: str):
    response = await treq.get(url).addTimeout(10, reactor)
    return response, json.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_a_proxy_started_before_its_engine_serves_the_first_player_at_once(
    proxy_factory,
):
    """
    The engine is down when the proxy starts, and its periodic probe is an
    hour away: a player arriving once the engine is up is served at once,
    its request having probed the engine.  Before that, C{/health} says
    why it is degraded, and a player's 503 names the engine and when to
    come back.
    """
    port = free_port()
    engine_config = EngineConfig("late", f"http://127.0.0.1:{port}")
    proxy = await proxy_factory([engine_config], probe_interval=3600)

    response, health = await answer(proxy.url + "/health")
    assert response.code == 503
    assert health["status"] == "degraded" and health["engines_healthy"] == 0
    assert health["reason"] == "no healthy engine: engine late failed get_version: ConnectionRefusedError"

    response, error = await answer(proxy.stream_url(KEY))
    assert response.code == 503
    assert error == {
        "error": "no healthy engine: engine late failed get_version: ConnectionRefusedError"
    }
    assert response.headers.getRawHeaders("retry-after") == ["5"]

    engine = start_engine()
    await engine.stop()
    late = reactor.listenTCP(port, Site(engine.engine.resource()), interface="127.0.0.1")
    try:
        player = await Player.open(proxy.stream_url(KEY))
        assert player.response.code == 200
        await player.wait_bytes(10 * 188)
        response, health = await answer(proxy.url + "/health")
        assert (response.code, health["status"], health["engines_healthy"]) == (200, "ok", 1)
        assert "reason" not in health
        player.disconnect()
    finally:
        await late.stopListening()


# --- the process' own reports -------------------------------------------------


def run_twistd(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TWISTD, "-n", *arguments],
        env=child_environment(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "arguments, line",
    [
        (
            ["--config", "aceproxy.toml"],
            "aceproxy: unknown key: tuning.heartbeat_intervall",
        ),
        (
            ["--log-format", "xml"],
            'aceproxy: log_format: expected "text" or "json", got "xml"',
        ),
        (
            ["--lsten", "tcp:8000"],
            "aceproxy: option --lsten not recognized (see: twistd aceproxy --help)",
        ),
    ],
)
def test_a_configuration_error_is_one_line_and_status_1(tmp_path, arguments, line):
    (tmp_path / "aceproxy.toml").write_text("[tuning]\nheartbeat_intervall = 5\n")
    done = run_twistd(tmp_path, "--pidfile=", "aceproxy", *arguments)
    assert done.returncode == 1, done
    assert done.stderr == line + "\n"
    assert done.stdout == ""


def test_a_port_in_use_is_one_line_and_status_1(tmp_path):
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"tcp:{port}:interface=127.0.0.1"
        done = run_twistd(tmp_path, "--pidfile=twistd.pid", "aceproxy", "--listen", listen)
    finally:
        taken.close()
    assert done.returncode == 1, done
    assert done.stderr == (
        f"aceproxy: cannot listen on {listen}: address already in use;"
        " choose another endpoint with --listen (e.g. --listen tcp:8001)"
        " or listen in the configuration file\n"
    )
    assert "Traceback" not in done.stdout
    # twistd's pid file goes, as it would after any failed start.
    assert not (tmp_path / "twistd.pid").exists()


SECRET_TOKEN = "token-8d1c0f5e7a"
SECRET_PASSWORD = "password-3b9e44a2"


@pytest.fixture
def locked_redis():
    server = RedisServer(password=SECRET_PASSWORD).start()
    yield server
    server.stop()


@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest_twisted.ensureDeferred
async def test_the_log_of_a_daemon_started_before_its_engine(
    spawn, tmp_path, locked_redis, log_format  # noqa: F811
):
    """
    A whole first contact as an operator sees it in the log: the daemon,
    started before its engine with a Redis password and an admin token,
    logs the failed probe once, serves a player as soon as the engine is
    up, and logs that.  In JSON, every line is one object carrying the
    event's fields; in either format, no factory chatter, and neither
    secret.
    """
    port = free_port()
    (tmp_path / "aceproxy.toml").write_text(
        f'log_format = "{log_format}"\n[tuning]\nprobe_interval = 3600\n'
    )
    redis_url = f"redis://:{SECRET_PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    proxy = twistd(
        spawn,
        "aceproxy",
        "aceproxy",
        "--config",
        "aceproxy.toml",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--engine",
        f"http://127.0.0.1:{port}",
        "--redis",
        redis_url,
        "--admin-token",
        SECRET_TOKEN,
    )
    proxy_url = f"http://127.0.0.1:{(await proxy.wait_for_line(PROXY_LISTENING, 30)).group(1)}"
    await proxy.wait_for_line("failed its health probe", 30)
    response, error = await answer(f"{proxy_url}/ace/getstream?id={KEY}")
    assert response.code == 503, error

    sim = twistd(spawn, "acesim", "acesim", "--port", f"tcp:{port}:interface=127.0.0.1")
    await sim.wait_for_line(SIM_LISTENING, 30)
    player = await Player.open(f"{proxy_url}/ace/getstream?id={KEY}")
    assert player.response.code == 200
    await player.wait_bytes(10 * 188)
    await proxy.wait_for_line("is healthy again", 10)
    # An admin call, so that the token is handled at least once.
    streams = await treq.get(
        f"{proxy_url}/streams", headers={"Authorization": f"Bearer {SECRET_TOKEN}"}
    )
    assert streams.code == 200
    await treq.content(streams)
    player.disconnect()

    proxy.send_signal("TERM")
    await proxy.wait_exit(15)
    lines = proxy.lines
    assert proxy.exit_signal == signal.SIGTERM, proxy.output()
    assert not [line for line in lines if "Traceback" in line], proxy.output()
    for secret in (SECRET_TOKEN, SECRET_PASSWORD):
        assert not [line for line in lines if secret in line], proxy.output()
    assert not [line for line in lines if re.search(r"(Starting|Stopping) factory", line)]

    engine_id = f"127.0.0.1:{port}"
    if log_format == "json":
        events = [json.loads(line) for line in lines if line]
        assert all(isinstance(event, dict) for event in events)
        probes = [
            (e["log_format"], e["engine"])
            for e in events
            if e.get("log_namespace") == "acestream_proxy.engine.registry.EngineRegistry"
        ]
        assert probes == [
            ("engine {engine} failed its health probe: {why}", engine_id),
            ("engine {engine} is healthy again (version {version})", engine_id),
        ]
        started = [e for e in events if e.get("key") == KEY]
        assert started, proxy.output()
        assert events[-1]["log_format"] == "Server Shut Down."
    else:
        assert proxy.stopped_cleanly(), proxy.output()
        with pytest.raises(ValueError):
            json.loads(lines[0])
        probes = [line for line in lines if "EngineRegistry" in line]
        assert len(probes) == 2, proxy.output()
        assert f"engine {engine_id} failed its health probe: engine {engine_id}" in probes[0]
        assert f"engine {engine_id} is healthy again (version 3.1.5)" in probes[1]


# --- options and the Makefile ---------------------------------------------------


def test_log_format_flag_wins_over_the_file(tmp_path):
    from acestream_proxy.tap import Options

    (tmp_path / "a.toml").write_text('log_format = "json"\n')
    options = Options()
    options.parseOptions(["--config", str(tmp_path / "a.toml")])
    assert options.config.log_format == "json"
    options = Options()
    options.parseOptions(["--config", str(tmp_path / "a.toml"), "--log-format", "text"])
    assert options.config.log_format == "text"
    options = Options()
    options.parseOptions([])
    assert options.config.log_format == "text"


def test_json_logs_and_twistds_logger_exclude_each_other(capsys):
    from acestream_proxy.tap import Options

    options = Options()
    options.parent = {"logger": "some.module.observer"}
    with pytest.raises(SystemExit) as info:
        options.parseOptions(["--log-format", "json"])
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        "aceproxy: log_format json and twistd's --logger exclude each other"
        " (see: twistd aceproxy --help)\n"
    )


def test_json_goes_where_twistd_would_write_its_text(tmp_path):
    from twisted.python.logfile import LogFile

    from acestream_proxy.logs import log_file

    assert log_file({"logfile": None, "nodaemon": True}) is sys.stdout
    assert log_file({"logfile": "-", "nodaemon": True}) is sys.stdout
    written = log_file({"logfile": str(tmp_path / "aceproxy.log"), "nodaemon": True})
    try:
        assert isinstance(written, LogFile) and written.path == str(tmp_path / "aceproxy.log")
    finally:
        written.close()


def make_dry_run(*arguments: str) -> str:
    from .test_end_to_end import ROOT

    done = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "VENV=/nonexistent/venv", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_run_installs_only_what_running_needs():
    installs = [line for line in make_dry_run("run").splitlines() if "pip install" in line]
    assert installs[-1] == "/nonexistent/venv/bin/pip install -q ."
    assert "[test]" not in make_dry_run("run") and "[test]" not in make_dry_run("demo")
    assert "'.[test]'" in make_dry_run("test")
    # The demo makes its picture with PyAV once: its own extra, not the tests'.
    demo_installs = [line for line in make_dry_run("demo").splitlines() if "pip install" in line]
    assert demo_installs[-1] == "/nonexistent/venv/bin/pip install -q '.[demo]'"


def test_make_demo_passes_demo_args():
    (line,) = [
        line
        for line in make_dry_run("demo", "DEMO_ARGS=--listen tcp:8000").splitlines()
        if "acestream_proxy.testing.demo" in line
    ]
    assert line.endswith("-m acestream_proxy.testing.demo --listen tcp:8000")
