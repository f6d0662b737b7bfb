"""
The daemon's configuration: one validated L{Config} built from a TOML file,
command-line flags and defaults.

Every mistake is reported as a L{ConfigError} whose message is one line naming
the offending key, because twistd shows it to the operator verbatim and a
traceback or a vague message would send them hunting through the file.
"""

import json
import math
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
from twisted.internet.endpoints import serverFromString

_DEFAULT_PORTS = MappingProxyType({"http": 80, "https": 443})
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
REDIS_SHAPE = (
    "redis://[[user]:password@]host[:port][/db],"
    " rediss://[[user]:password@]host[:port][/db][?ssl_ca_certs=PATH]"
    " or unix:///path[?db=N]"
)
# Counts for which zero is meaningful: start at the live edge, never reconnect,
# no limit per client address (behind a reverse proxy on another machine,
# every client has its address).
_MAY_BE_ZERO = frozenset(
    {
        "join_chunks",
        "max_reconnects",
        "max_connections_per_address",
        "max_new_streams_per_address",
    }
)


class ConfigError(Exception):
    """
    A configuration mistake, described in one line that names the key.

    Line breaks coming from other libraries' messages are folded, so that the
    text always fits the single line twistd prints before exiting.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in message.splitlines()))


@attrs.frozen
class EngineConfig:
    """
    One AceStream engine the proxy may open sessions on.

    @ivar id: Stable name of the engine, used to record which engine serves
        which stream; defaults to C{"host:port"}.
    @ivar url: Base URL, normalised to C{"http(s)://host:port"} so that two
        spellings of one engine compare equal.
    @ivar forwarded: The engine's peer-to-peer port is forwarded, so other
        peers can reach it and it usually streams better; it is preferred
        over an equally loaded engine.
    """

    id: str
    url: str
    forwarded: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or _DEFAULT_PORTS[parts.scheme]


@attrs.frozen
class Tuning:
    """
    Every number the daemon uses, in one place so that operators can adjust
    them without reading code.  Durations are in seconds.
    """

    heartbeat_interval: float = 10
    ghost_client_timeout: float = 50
    chunk_ttl: float = 60
    buffer_chunks: int = 1000
    # A new player starts this many chunks behind the live edge, so that its
    # decoder gets a running start instead of stalling on the next chunk.
    join_chunks: int = 3
    cleanup_grace: float = 5
    no_data_timeout: float = 10
    reconnect_after: float = 30
    owner_lease: float = 15
    # A worker that has not said it runs for this long is taken for dead:
    # its streams are taken over and its players removed at once.
    worker_timeout: float = 3
    engine_connect_timeout: float = 5
    engine_timeout: float = 15
    first_byte_timeout: float = 20
    probe_interval: float = 30
    write_timeout: float = 30
    max_reconnects: int = 5
    max_streams: int = 100
    max_clients_per_stream: int = 500
    max_clients: int = 2000
    # A client must send its whole request head within this long of
    # connecting (or of its previous response): a slow trickle of header
    # bytes would otherwise hold a connection indefinitely.
    header_timeout: float = 10
    # Per client address (loopback excepted): a household behind NAT has a
    # few players, each with a connection or two; one client alone must not
    # hold the daemon's descriptors or make the engines open many swarms.
    max_connections_per_address: int = 32
    max_new_streams_per_address: int = 10


@attrs.frozen
class Config:
    """
    The whole configuration.  Build it with L{build}, which validates; the
    constructor trusts its arguments.

    @ivar redis: Shared store URL; L{None} keeps state in memory, which suits a
        single daemon.
    @ivar admin_token: Bearer token required by administrative requests;
        with L{None} they are accepted from loopback addresses only.
    """

    listen: str = "tcp:8000"
    # Not in the repr: the URL may carry Redis' password.
    redis: str | None = attrs.field(default=None, repr=False)
    admin_token: str | None = None
    engines: tuple[EngineConfig, ...] = (
        EngineConfig("127.0.0.1:6878", "http://127.0.0.1:6878"),
    )
    tuning: Tuning = Tuning()


def load_file(path: str) -> dict[str, Any]:
    """
    Read a TOML configuration file, turning every failure into a
    L{ConfigError} that names the file.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({err.reason})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None


def build(
    file_data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> Config:
    """
    Validate C{file_data} (as read by L{load_file}) and C{overrides} (from
    the command line) into a L{Config}.

    Overrides win over the file and the file over the defaults.  An override
    that is L{None} or, for C{engines}, empty was not given.  Override
    C{engines} are L{EngineConfig}s and replace the file's engines entirely,
    because merging two lists of engines would be guesswork.
    """
    _reject_unknown(file_data, _names(Config), "")
    given = {k: v for k, v in (overrides or {}).items() if v is not None and v != []}
    _reject_unknown(given, _names(Config) - {"tuning"}, "", what="override")
    values = {**file_data, **given}
    kwargs: dict[str, Any] = {}
    if "listen" in values:
        kwargs["listen"] = _non_empty_string(values["listen"], "listen")
    if "redis" in values:
        kwargs["redis"] = _redis_url(values["redis"])
    if "admin_token" in values:
        kwargs["admin_token"] = _non_empty_string(values["admin_token"], "admin_token")
    if "engines" in given:
        kwargs["engines"] = tuple(given["engines"])
    elif "engines" in file_data:
        kwargs["engines"] = _file_engines(file_data["engines"])
    if "tuning" in file_data:
        kwargs["tuning"] = _tuning(file_data["tuning"])
    config = Config(**kwargs)
    _check_engine_ids(config.engines)
    _check_listen(config.listen)
    return config


def engine_from_url(
    url: Any, *, forwarded: bool = False, id: Any = None, key: str = "url"
) -> EngineConfig:
    """
    Make an L{EngineConfig} from a URL, naming it C{"host:port"} unless an
    C{id} is given.  C{key} names the setting in error messages.
    """
    if not isinstance(url, str):
        raise ConfigError(f"{key}: expected a string, got {_show(url)}")
    normal = _normalise_engine_url(url)
    if normal is None:
        raise ConfigError(
            f"{key}: not an http(s) URL with host and port: {_show(url)}"
        )
    return EngineConfig(
        id=normal.split("://", 1)[1] if id is None else id,
        url=normal,
        forwarded=forwarded,
    )


def _names(cls: type) -> frozenset[str]:
    return frozenset(field.name for field in attrs.fields(cls))


def _reject_unknown(
    table: Mapping[str, Any], known: frozenset[str], prefix: str, what: str = "key"
) -> None:
    """
    Fail on the first key not in C{known}, since a misspelt key would
    otherwise be silently ignored.
    """
    for name in table:
        if name not in known:
            raise ConfigError(f"unknown {what}: {prefix}{_key(name)}")


def _key(name: str) -> str:
    """Spell a key as TOML would, so that odd keys stay readable and on one line."""
    return name if _BARE_KEY.fullmatch(name) else _show(name)


def _show(value: Any) -> str:
    """A value as it could appear in TOML, escaped to stay on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    return repr(value)


def _non_empty_string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {_show(value)}")
    return value


def _table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table, got {_show(value)}")
    return value


def _file_engines(value: Any) -> tuple[EngineConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            f"engines: expected an array of tables ([[engines]]), got {_show(value)}"
        )
    return tuple(_file_engine(item, f"engines[{i}]") for i, item in enumerate(value))


def _file_engine(value: Any, key: str) -> EngineConfig:
    table = _table(value, key)
    _reject_unknown(table, _names(EngineConfig), f"{key}.")
    if "url" not in table:
        raise ConfigError(f"{key}.url: missing")
    forwarded = table.get("forwarded", False)
    if not isinstance(forwarded, bool):
        raise ConfigError(
            f"{key}.forwarded: expected true or false, got {_show(forwarded)}"
        )
    engine_id = table.get("id")
    if engine_id is not None:
        _non_empty_string(engine_id, f"{key}.id")
    return engine_from_url(
        table["url"], forwarded=forwarded, id=engine_id, key=f"{key}.url"
    )


def _check_engine_ids(engines: Sequence[EngineConfig]) -> None:
    """
    Engine ids name engines in shared state, so two engines must not share
    one.
    """
    if not engines:
        raise ConfigError("engines: expected at least one engine")
    seen: dict[str, int] = {}
    for i, engine in enumerate(engines):
        if engine.id in seen:
            raise ConfigError(
                f"engines[{i}].id: duplicate engine id {_show(engine.id)}"
                f" (also engines[{seen[engine.id]}])"
            )
        seen[engine.id] = i


def _normalise_engine_url(url: str) -> str | None:
    """
    C{"scheme://host:port"} for an http(s) URL naming only a host and an
    optional port, or L{None}.  Anything more (a path, a query, credentials)
    is refused rather than dropped, since the proxy would silently ignore it.
    """
    if not _is_plain(url) or "?" in url or "#" in url:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or port == 0
    ):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def _redis_url(value: Any) -> str:
    """
    Check the shape only; whether the store answers is found out at startup.
    A URL refused is shown without its password.
    """
    if (
        isinstance(value, str)
        and _is_plain(value)
        and (_is_tcp_redis(value) or _is_unix_redis(value))
    ):
        return value
    if isinstance(value, str):
        value = _without_password(value)
    raise ConfigError(f"redis: expected {REDIS_SHAPE}, got {_show(value)}")


def _is_tcp_redis(url: str) -> bool:
    """
    C{redis://} or C{rediss://} (TLS), with a host, an optional user name
    and password (a user part with no colon is the password: Redis cannot
    log in with a user name alone), and for TLS only, the certificate
    authorities to trust in C{ssl_ca_certs}.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme in ("redis", "rediss")
        and bool(parts.hostname)
        and _redis_credentials_ok(parts.netloc)
        and port != 0
        and re.fullmatch(r"(/[0-9]*)?", parts.path) is not None
        and _redis_query_ok(url, parts)
        and "#" not in url
    )


def _redis_credentials_ok(netloc: str) -> bool:
    """
    No user part, or a non-empty password (after the colon, if any).
    """
    if "@" not in netloc:
        return True
    userinfo = netloc.rpartition("@")[0]
    return bool(userinfo.partition(":")[2] if ":" in userinfo else userinfo)


def _redis_query_ok(url: str, parts) -> bool:
    if "?" not in url:
        return True
    query = parse_qsl(parts.query, keep_blank_values=True)
    return (
        parts.scheme == "rediss"
        and [name for name, _ in query] == ["ssl_ca_certs"]
        and all(path for _, path in query)
    )


def _without_password(url: str) -> str:
    """
    C{url} with whatever stands between C{://} and the last C{@} hidden but
    for a user name, so that an error never shows a password, however
    malformed the URL around it.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = (rest if sep else url).rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon and "/" not in user else "***"
    return f"{scheme}{sep}{shown}@{after}" if sep else f"{shown}@{after}"


def _is_unix_redis(url: str) -> bool:
    return re.fullmatch(r"unix://(/[^?#]*[^/?#])(\?db=[0-9]+)?", url) is not None


def _is_plain(url: str) -> bool:
    """
    No spaces or control characters, which L{urlsplit} would quietly strip
    and thereby accept a URL other than the one written.
    """
    return not any(c.isspace() or not c.isprintable() for c in url)


def _tuning(value: Any) -> Tuning:
    table = _table(value, "tuning")
    _reject_unknown(table, _names(Tuning), "tuning.")
    values = {
        field.name: _tuning_number(table[field.name], field)
        for field in attrs.fields(Tuning)
        if field.name in table
    }
    tuning = Tuning(**values)
    if tuning.join_chunks >= tuning.buffer_chunks:
        raise ConfigError(
            f"tuning.join_chunks: must be less than tuning.buffer_chunks"
            f" ({tuning.buffer_chunks}), got {tuning.join_chunks}"
        )
    if tuning.ghost_client_timeout <= tuning.heartbeat_interval:
        raise ConfigError(
            f"tuning.ghost_client_timeout: must be greater than"
            f" tuning.heartbeat_interval ({tuning.heartbeat_interval:g}),"
            f" got {tuning.ghost_client_timeout:g}"
        )
    return tuning


def _tuning_number(value: Any, field: attrs.Attribute) -> float | int:
    """
    Counts must be integers and durations positive, finite numbers; booleans
    are refused although Python counts them as integers, since C{true} for a
    number is certainly a mistake.
    """
    key = f"tuning.{field.name}"
    if field.type is int:
        minimum = 0 if field.name in _MAY_BE_ZERO else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            wanted = "a non-negative" if minimum == 0 else "a positive"
            raise ConfigError(f"{key}: expected {wanted} integer, got {_show(value)}")
        return value
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{key}: expected a positive number, got {_show(value)}")
    return float(value)


def _check_listen(listen: str) -> None:
    """
    Parse the endpoint description now (parsing does not listen) so that a
    typo is reported at startup with the key's name.

    A C{systemd:} endpoint only resolves under socket activation, so only
    its arguments are checked; the descriptor is looked up when listening.
    (Asking L{twisted.python.systemd.ListenFDs} here is no option: reading
    the environment consumes it.)
    """
    if listen.split(":", 1)[0].lower() == "systemd":
        _check_systemd_listen(listen)
        return
    from twisted.internet import reactor

    try:
        serverFromString(reactor, listen)
    except Exception as err:
        raise ConfigError(
            f"listen: not a valid endpoint description: {_show(listen)} ({err})"
        ) from None


def _check_systemd_listen(listen: str) -> None:
    arguments = dict(field.partition("=")[::2] for field in listen.split(":")[1:])
    problem = None
    if not hasattr(socket, f"AF_{arguments.get('domain')}"):
        problem = "domain must name an address family, e.g. domain=INET"
    elif ("index" in arguments) == ("name" in arguments):
        problem = "give exactly one of index=N and name=NAME"
    elif "index" in arguments and not arguments["index"].isdecimal():
        problem = "index must be a non-negative integer"
    elif set(arguments) - {"domain", "index", "name"}:
        problem = "only domain, index and name are accepted"
    if problem:
        raise ConfigError(
            f"listen: not a valid endpoint description: {_show(listen)} ({problem})"
        )
