"""
The command line of C{twistd aceproxy}: flags that override the TOML file,
validated into a L{Config} before anything starts.
"""

from twisted.python import usage

from .config import Config, assemble, engine_from_url, load_file
from .config_checks import REDIS_SHAPE, ConfigError, check_listen


class Options(usage.Options):
    """
    Command-line options of the C{aceproxy} twistd plugin.  After parsing,
    C{self.config} holds the validated L{Config}.
    """

    synopsis = "[options]"
    longdesc = (
        "Lets many video players watch one AceStream broadcast through a "
        "single engine session: players connect over HTTP and share one "
        "MPEG-TS stream fetched once from an AceStream engine. Settings come "
        "from the command line, then the --config file, then defaults."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        [
            "listen",
            "l",
            None,
            "Endpoint to serve players on, e.g. tcp:8000 or "
            "systemd:domain=INET:index=0 [default: tcp:8000].",
        ],
        [
            "redis",
            None,
            None,
            f"Shared store, {REDIS_SHAPE} [default: in memory].",
        ],
        [
            "admin-token",
            None,
            None,
            "Bearer token for administrative requests [default: none: loopback only].",
        ],
        [
            "log-format",
            None,
            None,
            "text or json (one JSON object per line, with each event's fields) [default: text].",
        ],
    ]
    optFlags = [
        [
            "reuse-port",
            None,
            "Listen on the tcp: port with SO_REUSEPORT, shared by several workers"
            " of this host [needs --redis; default: off].",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["engine-flags"] = []

    def opt_engine(self, url: str) -> None:
        """Engine URL, e.g. http://127.0.0.1:6878 (repeatable; replaces the file's engines)."""
        self["engine-flags"].append((url, False))

    def opt_forwarded_engine(self, url: str) -> None:
        """Like --engine, for an engine whose peer-to-peer port is forwarded; preferred on equal load (repeatable)."""
        self["engine-flags"].append((url, True))

    def postOptions(self) -> None:
        """
        Build the configuration now, so that a mistake stops twistd with one
        line before anything starts.
        """
        try:
            file_data = load_file(self["config"]) if self["config"] else {}
            engines = [
                engine_from_url(
                    url,
                    forwarded=forwarded,
                    key="--forwarded-engine" if forwarded else "--engine",
                )
                for url, forwarded in self["engine-flags"]
            ]
            config = assemble(
                file_data,
                {
                    "listen": self["listen"],
                    # Absent, the flag leaves the file's setting alone.
                    "reuse_port": True if self["reuse-port"] else None,
                    "redis": self["redis"],
                    "admin_token": self["admin-token"],
                    "log_format": self["log-format"],
                    "engines": engines,
                },
            )
            self.assembled(config)
            check_listen(config.listen)
        except ConfigError as err:
            raise usage.UsageError(str(err)) from None
        self.config = config

    def assembled(self, config: Config) -> None:
        """
        Called with the configuration before its C{listen} endpoint is
        parsed, which is the first thing here to import Twisted's
        networking modules.  Nothing by default; the daemon's options
        decide there whether the process loads TLS
        (L{acestream_proxy.tap.Options}).
        """
