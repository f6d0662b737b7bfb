"""
The container and multi-worker deployment files of C{contrib/} and
C{systemd/}, checked as far as this machine allows.

Docker itself cannot run here, so:

- C{compose.yaml} is parsed, and the files it mounts, the ports it
  publishes and the services it names are checked against C{contrib/},
  the Dockerfile and the HAProxy configuration;
- the HAProxy and nginx configurations are checked against the compose
  and systemd setups, and by C{haproxy -c} and C{nginx -t} when those
  binaries exist (C{make test} installs them where it can; see
  C{contrib/test-tools.sh});
- the systemd units are checked by C{systemd-analyze verify} when it
  exists;
- the Dockerfile's own commands are read from it and run for real
  (L{test_dockerfile_commands_run}, the slow one: a C{pip install .} into
  a fresh virtual environment, a minute or two): its RUN line, then its
  CMD (the daemon, against the simulated engine the compose file runs),
  then its HEALTHCHECK.
"""

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from acestream_proxy import config as aceconfig

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
SYSTEMD = ROOT / "systemd"
WORKERS = ("aceproxy-1", "aceproxy-2")


# -- Readers -------------------------------------------------------------------


def dockerfile_instructions(path: Path = CONTRIB / "Dockerfile") -> list[tuple[str, str]]:
    """
    C{(INSTRUCTION, arguments)} of a Dockerfile, continuation lines joined
    and comments dropped.
    """
    instructions = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def dockerfile_env(instructions) -> dict[str, str]:
    """The image's ENV, in C{KEY=value} form only (the form this one uses)."""
    env = {}
    for keyword, arguments in instructions:
        if keyword == "ENV":
            for item in shlex.split(arguments):
                key, equals, value = item.partition("=")
                assert equals, f"ENV {item!r}: use KEY=value"
                env[key] = value
    return env


def one(instructions, keyword: str) -> str:
    found = [arguments for kw, arguments in instructions if kw == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def exec_form(arguments: str) -> list[str]:
    """A CMD or HEALTHCHECK CMD in exec (JSON) form; the shell form is refused."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


def healthcheck_command(instructions) -> list[str]:
    arguments = one(instructions, "HEALTHCHECK")
    options, separator, command = arguments.partition("CMD ")
    assert separator, arguments
    assert "--timeout=" in options and "--interval=" in options
    return exec_form(command)


def compose() -> dict:
    with open(CONTRIB / "compose.yaml") as f:
        return yaml.safe_load(f)


def haproxy_sections(path: Path = CONTRIB / "haproxy.cfg") -> dict[str, list[list[str]]]:
    """C{"backend aceproxy"}: its lines, split in words, comments dropped."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = " ".join(line.split())
            sections[current] = []
        else:
            assert current is not None, line
            sections[current].append(line.split())
    return sections


def directives(lines, name: str) -> list[list[str]]:
    return [words[1:] for words in lines if words[0] == name]


SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", text).groups()
    return int(number) * SECONDS[unit or "s"]


def nginx_directives(text: str) -> list[tuple[str, list[str]]]:
    """Every simple directive of an nginx file, C{(name, arguments)}."""
    text = re.sub(r"#[^\n]*", "", text)
    return [
        (words[0], words[1:])
        for statement in re.split(r"[;{}]", text)
        if (words := statement.split())
    ]


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- compose.yaml ----------------------------------------------------------------


def test_compose_services():
    """
    Redis, two workers built from contrib/Dockerfile, HAProxy in front and
    the simulated engine; the workers wait for Redis.
    """
    services = compose()["services"]
    assert set(services) == {"redis", *WORKERS, "haproxy", "engine"}
    assert services["redis"]["image"].startswith("redis:")
    for name in (*WORKERS, "engine"):
        build = services[name]["build"]
        assert (CONTRIB / build["context"] / build["dockerfile"]).resolve() == (
            CONTRIB / "Dockerfile"
        )
        assert (CONTRIB / build["context"]).resolve() == ROOT
    for name in WORKERS:
        # Started once Redis answers and the engine is healthy: a worker
        # probing an engine not listening yet gives no stream for 30 s.
        for dependency in ("redis", "engine"):
            condition = services[name]["depends_on"][dependency]["condition"]
            assert condition == "service_healthy", (name, dependency)
        assert "ports" not in services[name], "players go through HAProxy"
    assert set(services["haproxy"]["depends_on"]) == set(WORKERS)
    assert services["haproxy"]["image"].startswith("haproxy:")
    # The simulated engine is the image's own acesim plugin.
    command = services["engine"]["command"]
    assert command[:2] == ["twistd", "-n"] and "acesim" in command
    # ... which has no /health: the image's HEALTHCHECK is replaced by one
    # on the engine API the daemon probes.
    assert "method=get_version" in " ".join(services["engine"]["healthcheck"]["test"])
    # A commented-out real engine service stands ready to replace it.
    text = (CONTRIB / "compose.yaml").read_text()
    assert re.search(r"^  # engine:\n  #   image: ", text, re.M)


def test_compose_mounts_existing_files():
    """
    Every bind mount's source exists in contrib/, and the workers read the
    configuration where they mount it.
    """
    services = compose()["services"]
    mounts = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            assert source.startswith("./"), f"{name}: {volume}: a file of contrib/"
            assert (CONTRIB / source).is_file(), f"{name}: {source} does not exist"
            assert mode == ["ro"], volume
            mounts += 1
    assert mounts == len(WORKERS) + 1
    assert services["haproxy"]["volumes"] == [
        "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"
    ]
    for name in WORKERS:
        config = services[name]["environment"]["ACEPROXY_CONFIG"]
        assert services[name]["volumes"] == [f"./aceproxy.toml:{config}:ro"]


def test_compose_configuration_is_valid():
    """
    The workers' configuration loads as the daemon loads it, and points at
    the compose file's engine and Redis services.
    """
    services = compose()["services"]
    cfg = aceconfig.build(aceconfig.load_file(str(CONTRIB / "aceproxy.toml")))
    assert [(e.host, e.port) for e in cfg.engines] == [("engine", engine_port(services))]
    assert cfg.redis.startswith("redis://redis:6379/")
    assert "6379" not in str(services["redis"].get("ports", ""))
    # Every player comes from HAProxy's address.
    assert cfg.tuning.max_connections_per_address == 0
    assert cfg.tuning.max_new_streams_per_address == 0


def engine_port(services) -> int:
    command = services["engine"]["command"]
    endpoint = command[command.index("--port") + 1]
    match = re.fullmatch(r"tcp:(\d+)", endpoint)
    assert match, f"{endpoint}: the engine must listen on all its interfaces"
    return int(match.group(1))


# -- HAProxy -------------------------------------------------------------------


def test_haproxy_balances_the_compose_workers():
    """
    The backend lists exactly the compose workers, on the port the image
    listens on; the frontend binds the port compose publishes; health is
    /health, as in the Dockerfile's HEALTHCHECK; timeouts fit streaming.
    """
    sections = haproxy_sections()
    image_port = dockerfile_env(dockerfile_instructions())["ACEPROXY_PORT"]
    assert re.search(r"EXPOSE " + image_port + r"\b", (CONTRIB / "Dockerfile").read_text())

    backend = sections["backend aceproxy"]
    servers = {words[0]: words[1] for words in directives(backend, "server")}
    assert servers == {name: f"{name}:{image_port}" for name in WORKERS}
    assert directives(backend, "balance") in (
        [["leastconn"]],
        [["roundrobin"]],
    )
    assert ["httpchk", "GET", "/health"] in directives(backend, "option")
    assert any("check" in words for words in directives(backend, "default-server"))
    healthcheck = " ".join(healthcheck_command(dockerfile_instructions()))
    assert "/health'" in healthcheck

    frontend = sections["frontend players"]
    [[bind]] = directives(frontend, "bind")
    port = bind.rsplit(":", 1)[1]
    assert compose()["services"]["haproxy"]["ports"] == [f"{port}:{port}"]

    defaults = sections["defaults"]
    assert ["http"] in directives(defaults, "mode")
    timeouts = {words[0]: seconds(words[1]) for words in directives(defaults, "timeout")}
    # A paused player, and a stream the daemon reconnects (40 s by default).
    for name in ("client", "server", "tunnel"):
        assert timeouts[name] >= 600, name
    assert ["no", "option", "http-buffer-request"] in defaults


def passing_output(command: list, timeout: float = 30, **options) -> str:
    """
    What C{command} (a checker: haproxy -c, nginx -t, systemd-analyze)
    printed, on both streams, once it exited with success.
    """
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **options)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_haproxy_accepts_the_configuration():
    """
    haproxy -c: valid, and its only warnings are the compose workers'
    names, which only Docker's DNS resolves (they start down, by
    init-addr none, until they resolve).
    """
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy is not installed (make test installs it where apt-get can)")
    output = passing_output([haproxy, "-c", "-f", str(CONTRIB / "haproxy.cfg")])
    assert "Configuration file is valid" in output
    for line in output.splitlines():
        assert "[ALERT]" not in line, output
        if "[WARNING]" in line:
            assert re.search(r"could not resolve address 'aceproxy-\d'", line), line


# -- nginx ---------------------------------------------------------------------


def socket_port() -> int:
    listen = unit(SYSTEMD / "aceproxy.socket")["Socket"]["ListenStream"]
    return int(listen.rsplit(":", 1)[1])


def test_nginx_upstream_is_the_workers_port():
    """
    The upstream is the port the aceproxy@ workers share (aceproxy.socket,
    or listen of the example configuration with reuse_port), and the
    proxying fits streaming.
    """
    found = nginx_directives((CONTRIB / "nginx.conf").read_text())
    [server] = [args for name, args in found if name == "server" and args]
    example = tomllib.loads((SYSTEMD / "aceproxy.toml.example").read_text())
    example_port = int(example["listen"].split(":")[1])
    assert server == [f"127.0.0.1:{socket_port()}"]
    assert socket_port() == example_port

    settings = {name: args for name, args in found}
    assert settings["proxy_pass"] == ["http://aceproxy"]
    assert settings["proxy_buffering"] == ["off"]
    assert settings["proxy_http_version"] == ["1.1"]
    assert ["Connection", '""'] in [args for name, args in found if name == "proxy_set_header"]
    assert seconds(settings["proxy_read_timeout"][0]) >= 600
    assert seconds(settings["proxy_send_timeout"][0]) >= 600


def test_nginx_accepts_the_configuration(tmp_path):
    """
    nginx -t, the snippet included in an http block as Debian's nginx.conf
    includes conf.d/, with every writable path in a temporary prefix.
    """
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (make test installs it where apt-get can)")
    temp = [
        f"{kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    ]
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path / 'nginx.pid'};\n"
        f"error_log {tmp_path / 'error.log'};\n"
        "events {}\n"
        "http {\n"
        f"    access_log {tmp_path / 'access.log'};\n"
        + "".join(f"    {line}\n" for line in temp)
        + f"    include {CONTRIB / 'nginx.conf'};\n"
        "}\n"
    )
    output = passing_output(
        [nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(main)]
    )
    assert "test is successful" in output
    assert "[warn]" not in output, output


# -- systemd -------------------------------------------------------------------


def test_worker_unit_points_at_the_nginx_example():
    text = (SYSTEMD / "aceproxy@.service").read_text()
    assert "contrib/nginx.conf" in text
    assert (ROOT / "contrib" / "nginx.conf").is_file()
    assert unit(SYSTEMD / "aceproxy@.service")["Service"]["Sockets"] == "aceproxy.socket"


def test_systemd_units_verify(tmp_path):
    """
    systemd-analyze verify on copies of the units whose ExecStart is the
    twistd this test runs with (it refuses a binary that does not exist):
    a check of the units' syntax and settings, warnings included.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists()
    for name in ("aceproxy.service", "aceproxy@.service", "aceproxy.socket"):
        text = (SYSTEMD / name).read_text()
        if name.endswith(".service"):
            text, count = re.subn(
                r"^ExecStart=\S+/twistd ", f"ExecStart={twistd} ", text, flags=re.M
            )
            assert count == 1, name
        (tmp_path / name).write_text(text)
    for name in ("aceproxy.socket", "aceproxy.service", "aceproxy@1.service", "aceproxy@2.service"):
        output = passing_output([analyze, "verify", str(tmp_path / name)], 60, cwd=tmp_path)
        # Unknown keys and unparsable values are only warnings.
        complaints = [line for line in output.splitlines() if "aceproxy" in line]
        assert not complaints, output


# -- Dockerfile ----------------------------------------------------------------


def test_dockerfile_image():
    """
    A slim Python base that satisfies python_requires, a non-root user,
    the sources pip needs copied, the daemon started on all interfaces.
    """
    instructions = dockerfile_instructions()
    base = one(instructions, "FROM")
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", base)
    assert match, base
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    required = setup["options"]["python_requires"]
    assert required.startswith(">=")
    minimum = tuple(int(part) for part in required[2:].split("."))
    assert (int(match.group(1)), int(match.group(2))) >= minimum

    user = one(instructions, "USER")
    assert user not in ("root", "0")
    assert any(
        kw == "RUN" and "useradd --system" in args and user in args for kw, args in instructions
    )
    # USER comes after the installation, and before CMD.
    keywords = [kw for kw, _ in instructions]
    assert keywords.index("USER") > max(
        i for i, (kw, args) in enumerate(instructions) if kw == "RUN" and "pip" in args
    )
    assert keywords.index("USER") < keywords.index("CMD")

    # What setup.cfg needs to build (long_description is README.rst).
    copied = {source for source, _ in copies(instructions)}
    assert {"pyproject.toml", "setup.cfg", "README.rst", "acestream_proxy", "twisted"} <= copied

    command = " ".join(exec_form(one(instructions, "CMD")))
    assert re.search(r'--listen \\?"tcp:\$ACEPROXY_PORT\\?"', command)
    assert "tcp:$ACEPROXY_PORT:interface" not in command


def copies(instructions) -> list[tuple[str, str]]:
    """C{(source, destination)} of every COPY, relative to WORKDIR /src."""
    result = []
    for keyword, arguments in instructions:
        if keyword == "COPY":
            *sources, destination = arguments.split()
            assert not any(s.startswith("--") for s in sources), arguments
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                target = source if destination == "./" else destination.removeprefix("./")
                result.append((source, target))
    return result


def run_line(instructions) -> str:
    """The RUN line that installs aceproxy."""
    [line] = [args for kw, args in instructions if kw == "RUN" and "pip" in args]
    return line


def test_dockerfile_installs_as_make_does():
    """
    The RUN line is pip install . into a virtual environment, then the
    plugin cache rebuild the Makefile does after its own install.
    """
    line = run_line(dockerfile_instructions())
    steps = [step.strip() for step in line.split("&&")]
    assert steps[0] == 'python -m venv "$VENV"'
    assert steps[1] == '"$VENV/bin/pip" install .'
    makefile = (ROOT / "Makefile").read_text()
    # Both of the Makefile's installs (with and without the test extras)
    # rebuild the cache with this one command.
    [cache] = set(re.findall(r"\$\(BIN\)/python (-c '.*getPlugins.*')", makefile))
    assert steps[2] == f'"$VENV/bin/python" {cache}'
    assert len(steps) == 3
    env = dockerfile_env(dockerfile_instructions())
    assert env["PATH"].startswith(env["VENV"] + "/bin:")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(command: list[str], env: dict) -> bool:
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """
    The image, built without Docker: the Dockerfile's COPYs into a fresh
    build context, then its RUN line with C{VENV} a fresh directory.

    SLOW: a real C{pip install .} into a new virtual environment, about a
    minute or two (from the configured package index or wheel cache).
    """
    instructions = dockerfile_instructions()
    base = tmp_path_factory.mktemp("image")
    context = base / "src"
    context.mkdir()
    for source, target in copies(instructions):
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source,
                context / target,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache"),
            )
        else:
            shutil.copy(ROOT / source, context / target)
    venv = base / "venv"
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.update(VENV=str(venv), PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # The image's "python": this Python's version, as the FROM line's.
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    result = subprocess.run(
        ["/bin/sh", "-c", run_line(instructions)],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return instructions, venv


def test_dockerfile_commands_run(image, tmp_path):
    """
    SLOW (the L{image} fixture). After the RUN line: the plugin cache is
    built, twistd aceproxy --help exits 0; the CMD starts a daemon that
    serves a stream from the compose file's simulated engine and passes
    the HEALTHCHECK; after docker stop's SIGTERM it shuts down within
    compose's stop_grace_period and the HEALTHCHECK fails.
    """
    instructions, venv = image
    assert list((venv / "lib").glob("python3.*/site-packages/twisted/plugins/dropin.cache"))
    bin = venv / "bin"
    help = subprocess.run(
        [bin / "twistd", "aceproxy", "--help"], capture_output=True, text=True, timeout=60
    )
    assert help.returncode == 0, help.stderr
    assert "--listen" in help.stdout and "--engine" in help.stdout

    image_env = dockerfile_env(instructions)
    sim_port, proxy_port = free_port(), free_port()
    env = {
        key: value.replace("$PATH", os.environ["PATH"]) for key, value in image_env.items()
    }
    env.update(
        PATH=f"{bin}:{os.environ['PATH']}",
        HOME=str(tmp_path),
        ACEPROXY_PORT=str(proxy_port),
        ACEPROXY_ENGINE=f"http://127.0.0.1:{sim_port}",
    )
    services = compose()["services"]
    compose_engine_port = engine_port(services)
    engine_command = [
        f"tcp:{sim_port}:interface=127.0.0.1" if arg.startswith("tcp:") else arg
        for arg in services["engine"]["command"]
    ]
    assert engine_command[0] == "twistd"
    processes = []
    daemon_log = open(tmp_path / "daemon.log", "w")
    try:
        engine = subprocess.Popen(
            engine_command, cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        processes.append(engine)
        # As compose starts the workers: once the engine is healthy.
        engine_check = [
            arg.replace(f":{compose_engine_port}/", f":{sim_port}/")
            for arg in services["engine"]["healthcheck"]["test"][1:]
        ]
        assert engine_check != services["engine"]["healthcheck"]["test"][1:]
        wait_for(lambda: healthy(engine_check, env), 60, "the engine's healthcheck")
        daemon = subprocess.Popen(
            exec_form(one(instructions, "CMD")), cwd=tmp_path, env=env,
            stdout=daemon_log, stderr=subprocess.STDOUT,
        )
        processes.append(daemon)
        check = healthcheck_command(instructions)
        wait_for(lambda: daemon.poll() is not None or healthy(check, env), 90, "HEALTHCHECK")
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
        assert f"tcp:{proxy_port}" in " ".join(
            open(f"/proc/{daemon.pid}/cmdline").read().split("\0")
        ), "the CMD's shell must exec twistd"

        # Listens on all interfaces, as a container's port must.
        assert any(
            line.split()[1].upper() == f"00000000:{proxy_port:04X}"
            for line in open("/proc/net/tcp").read().splitlines()[1:]
            if line.split()[3] == "0A"
        ), "not listening on 0.0.0.0"

        # A player through it, from the simulated engine.
        url = f"http://127.0.0.1:{proxy_port}/ace/getstream?id={'ab' * 20}"
        try:
            response = urllib.request.urlopen(url, timeout=30)
        except urllib.error.HTTPError as error:
            raise AssertionError((tmp_path / "daemon.log").read_text()) from error
        with response:
            assert response.headers["Content-Type"] == "video/mp2t"
            data = response.read(188 * 50)
        assert len(data) == 188 * 50
        assert all(data[i] == 0x47 for i in range(0, len(data), 188))

        # docker stop: SIGTERM, then SIGKILL after compose's stop_grace_period.
        grace = float(services["aceproxy-1"]["stop_grace_period"].removesuffix("s"))
        daemon.send_signal(signal.SIGTERM)
        # twistd ends an orderly shutdown by raising the signal again, so
        # that its parent sees why it ended.
        code = daemon.wait(timeout=grace)
        log = (tmp_path / "daemon.log").read_text()
        assert code in (0, -signal.SIGTERM), log
        assert "Server Shut Down." in log
        assert not healthy(check, env)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        daemon_log.close()
