"""
Tests for L{acestream_proxy.tap}, what C{twistd aceproxy} loads: its plugin
scan imports neither daemon, and the daemon forgoes the TLS stack when its
configuration has no use for it.  (That a real daemon maps no TLS library
is tested in C{test_end_to_end}.)
"""

import subprocess
import sys

import pytest
from twisted.python import usage

from acestream_proxy import tap
from acestream_proxy.config import assemble
from acestream_proxy.tap import Options, forgo_tls_unless_needed, tls_needed

from .test_end_to_end import child_environment


def config(**settings):
    """
    A configuration as the daemon assembles it, its listen endpoint not
    parsed (an C{ssl:} one would need its certificate files).
    """
    return assemble(settings)


@pytest.mark.parametrize(
    ("settings", "needed"),
    [
        ({}, False),
        ({"engines": [{"url": "http://10.0.0.1:6878"}, {"url": "http://e.lan"}]}, False),
        ({"engines": [{"url": "http://10.0.0.1:6878"}, {"url": "https://e.lan"}]}, True),
        ({"engines": [{"url": "HTTPS://e.lan:8443"}]}, True),
        # An orchestrator is asked at runtime, after the decision: its
        # scheme decides, whatever the engines it will announce.
        ({"engines_url": "http://orch.lan:8000/engines"}, False),
        ({"engines_url": "https://orch.lan/engines"}, True),
        ({"engines_url": "HTTPS://orch.lan/engines", "engines": [{"url": "http://e.lan"}]}, True),
        ({"redis": "rediss://db.lan:6380"}, True),
        # txredisapi imports Twisted's TLS module whatever the URL.
        ({"redis": "redis://db.lan"}, True),
        ({"redis": "unix:///run/redis.sock"}, True),
        ({"listen": "tcp:8000:interface=127.0.0.1"}, False),
        ({"listen": "TCP6:8000"}, False),
        ({"listen": "unix:/run/aceproxy.sock"}, False),
        ({"listen": "systemd:domain=INET:index=0"}, False),
        ({"listen": "ssl:8443:privateKey=key.pem"}, True),
        # An endpoint plugin's type: it may use TLS, so TLS stays available.
        ({"listen": "le:/srv/certs:tcp:443"}, True),
    ],
)
def test_tls_needed(settings, needed):
    assert tls_needed(config(**settings)) is needed


def test_forgo_tls_when_not_needed():
    modules = {"sys": sys}
    assert forgo_tls_unless_needed(config(), modules) is True
    assert modules == {"sys": sys, "OpenSSL": None}


def test_keep_tls_when_needed():
    modules = {}
    assert forgo_tls_unless_needed(config(redis="rediss://db.lan"), modules) is False
    assert modules == {}


@pytest.mark.parametrize("present", [object(), None])
def test_leave_openssl_alone_once_imported_or_decided(present):
    """
    Already imported, pyOpenSSL stays (something uses it); already made
    unimportable, nothing changes.
    """
    modules = {"OpenSSL": present}
    assert forgo_tls_unless_needed(config(), modules) is False
    assert modules == {"OpenSSL": present}


def test_options_decide_before_the_listen_endpoint_is_parsed(monkeypatch, capsys):
    """
    The daemon's options decide on TLS with the assembled configuration,
    before parsing C{listen}, the first thing to import Twisted's
    networking modules; a mistake in C{listen} is still one line on
    standard error, and exit status 1.
    """
    decided = []
    monkeypatch.setattr(tap, "forgo_tls_unless_needed", decided.append)
    options = Options()
    options.parseOptions(["--engine", "http://10.0.0.1:6878", "--listen", "tcp:8001"])
    assert decided == [options.config]
    assert options.config.listen == "tcp:8001"

    decided.clear()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(["--listen", "nonsense:"])
    assert info.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith('aceproxy: listen: not a valid endpoint description: "nonsense:"')
    assert not line.endswith("--help)")
    assert [c.listen for c in decided] == ["nonsense:"]


#: What C{twistd aceproxy --help} must not import: the reactor and
#: Twisted's TCP transport and endpoints (which would load TLS before the
#: daemon decides), TLS itself, the web stack and the daemons.
HEAVY = (
    "twisted.internet.reactor",
    "twisted.internet.tcp",
    "twisted.internet.endpoints",
    "OpenSSL",
    "klein",
    "treq",
    "txredisapi",
    "acestream_proxy.service",
    "acestream_proxy.testing.engine",
)

_HELP_IMPORTS = (
    "import sys; from twisted.scripts.twistd import run; "
    "sys.argv = ['twistd', 'aceproxy', '--help']\n"
    "try:\n    run()\nexcept SystemExit:\n    pass\n"
    f"print([m for m in {HEAVY!r} if sys.modules.get(m) is not None])"
)

#: Brings twistd's plugin cache up to date, as an installation should: a
#: stale cache makes twistd import every plugin module, Twisted's own
#: among them, which import its endpoints.
REFRESH_PLUGIN_CACHE = (
    "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
)


def test_help_imports_neither_daemon():
    """
    twistd's plugin scan imports every plugin module; ours import neither
    the proxy nor the simulated engine, so C{twistd aceproxy --help} stays
    light, and the daemon can still decide on TLS afterwards.
    """
    env = child_environment()
    subprocess.run([sys.executable, "-c", REFRESH_PLUGIN_CACHE], env=env, check=True)
    done = subprocess.run(
        [sys.executable, "-c", _HELP_IMPORTS], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--engine=" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]", done.stdout
