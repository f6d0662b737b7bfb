"""
What C{twistd aceproxy} loads: the plugin names this module, which imports
only the command line and the configuration.  The daemon itself
(L{acestream_proxy.service}) is imported by L{makeService}, once the
configuration is known and the process has decided whether it loads the
TLS stack at all (L{forgo_tls_unless_needed}).
"""

import sys
from collections.abc import MutableMapping

from twisted.application.service import IService
from twisted.python import usage

from .config import Config
from .config_checks import ConfigError
from .options import Options as CommandLine

__all__ = ["Options", "makeService", "tls_needed", "forgo_tls_unless_needed"]

#: Listen endpoint types that never use TLS.  Anything else (C{ssl:}, or
#: an endpoint plugin's type, which may) keeps TLS importable.
PLAIN_LISTEN_TYPES = frozenset({"tcp", "tcp6", "unix", "systemd"})


def tls_needed(config: Config) -> bool:
    """
    Whether a daemon running C{config} may use TLS: an C{https} engine or
    C{https} orchestrator (C{engines_url}, asked at runtime, long after
    this decision is taken for good); a Redis store, whatever its URL (C{rediss} is TLS, and txredisapi imports
    Twisted's TLS module even for plain Redis); or a listen endpoint other
    than plain TCP, a UNIX socket or a systemd-passed socket.
    """
    return (
        any(engine.url.lower().startswith("https:") for engine in config.engines)
        or (config.engines_url or "").lower().startswith("https:")
        or config.redis is not None
        or config.listen.split(":", 1)[0].lower() not in PLAIN_LISTEN_TYPES
    )


def forgo_tls_unless_needed(config: Config, modules: MutableMapping = sys.modules) -> bool:
    """
    Make pyOpenSSL unimportable in this process when C{config} has no use
    for TLS (L{tls_needed}), and say whether it did so.  Called at startup
    only, before anything imports the reactor or Twisted's endpoints.

    Why: Twisted's reactor, TCP transport, endpoints and HTTP client each
    try to import their TLS support (pyOpenSSL, and through it
    cryptography's Rust extension with OpenSSL linked in) and go without it
    if that import fails.  Loaded, it costs about 13 MB of resident memory
    (an idle daemon holds 58 MB with it, 45 MB without), for connections a
    daemon with plain-HTTP engines and the embedded store never makes.
    Without it, Twisted runs as it would where pyOpenSSL is not installed.
    An engine that answers with an C{https} URL on its own plain-HTTP port
    then fails with an engine error, as it would with TLS loaded, since
    that port does not speak TLS.

    A stale twistd plugin cache defeats this: twistd then imports every
    plugin module, Twisted's among them, which import its endpoints and so
    the TLS stack, before this runs.  The cache is rebuilt at install time
    (see the README).

    The decision is made once, from the configuration the daemon starts
    with: once the reactor is imported it cannot be taken back.  Engines
    announced at runtime by an orchestrator are always plain C{http} (it
    names a host and a port only), but the orchestrator itself may be
    C{https}: L{tls_needed} counts it.  Any future source of C{https} URLs
    at runtime must be part of this decision too.

    Nothing is done if pyOpenSSL is already imported (by whatever imported
    it first, a test runner for instance) or already made unimportable.
    """
    if tls_needed(config) or "OpenSSL" in modules:
        return False
    modules["OpenSSL"] = None
    return True


class Options(CommandLine):
    """
    The command line of C{twistd aceproxy}: L{CommandLine}, deciding
    what the process loads as soon as the configuration is assembled.
    """

    def assembled(self, config: Config) -> None:
        forgo_tls_unless_needed(config)

    def parseOptions(self, options=None) -> None:
        """
        A mistake on the command line or in the configuration ends twistd
        with one line on standard error naming it, and status 1: twistd
        would print its whole usage text first, burying the line.
        """
        try:
            super().parseOptions(options)
            server = getattr(self, "parent", None)
            if self.config.log_format == "json" and server is not None and server.get("logger"):
                raise usage.UsageError("log_format json and twistd's --logger exclude each other")
        except usage.UsageError as e:
            # A setting's error names its key; a flag's points to the flags.
            hint = "" if isinstance(e.__context__, ConfigError) else " (see: twistd aceproxy --help)"
            sys.stderr.write(f"aceproxy: {e}{hint}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None


def makeService(options: Options) -> IService:
    """
    The twistd plugin's entry point: the daemon of L{make_service}, as
    twistd runs it (L{acestream_proxy.logs.Daemon}: its log format, and
    one line if it cannot listen).
    """
    from .logs import Daemon, json_observer
    from .service import make_service

    server = getattr(options, "parent", None) or {}
    observer = json_observer(server) if options.config.log_format == "json" else None
    return Daemon(make_service(options.config), observer, server.get("pidfile"))
