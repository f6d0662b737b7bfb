"""
The daemon's configuration: one validated L{Config} built from a TOML file,
command-line flags and defaults.

Every mistake is reported as a L{ConfigError} whose message is one line naming
the offending key, because twistd shows it to the operator verbatim and a
traceback or a vague message would send them hunting through the file.
"""

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import attrs

from .channels import ChannelConfig, Network, file_channels, trusted_networks
from .config_checks import (
    ConfigError,
    _check_reuse_port,
    check_listen,
    _is_plain,
    _redis_url,
    _show,
)

_DEFAULT_PORTS = MappingProxyType({"http": 80, "https": 443})
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MAY_BE_ZERO = frozenset(
    {
        "join_chunks",
        "chunk_bytes",
        "max_reconnects",
        "max_connections_per_address",
        "max_new_streams_per_address",
    }
)

#: A window smaller than one chunk (eight TS packets) could not hold even
#: the newest chunk.
MIN_BUFFER_BYTES = 188 * 8

#: Bounds of the HLS settings: players start three segments from the live
#: edge, so fewer than three listed leaves them nothing to buffer, and long
#: segments or lists only add latency and memory.
MIN_HLS_TARGET, MAX_HLS_TARGET = 1, 10
MIN_HLS_LIST, MAX_HLS_LIST = 3, 20


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
    # A worker's window of a stream holds at most this many seconds and
    # bytes of it (4 Mbit/s for 8 s is about 4 MB); buffer_chunks and
    # chunk_ttl bound it too, and alone bound the shared Redis buffer.
    # buffer_seconds is also the most stream a new player of a video stream
    # waits through for a keyframe to start on before it starts anyway.
    buffer_seconds: float = 8
    buffer_bytes: int = 6 * 1024 * 1024
    # All of a worker's windows together hold at most this many bytes; the
    # largest shrink first when they would hold more.
    max_buffer_bytes: int = 256 * 1024 * 1024
    # What the engine sends is gathered into chunks of about this many bytes
    # before players get it, each chunk sent when it is full or when its
    # first bytes have waited chunk_delay: fewer, larger sends cost far less
    # CPU per player, and add at most chunk_delay of latency.  0 sends every
    # read from the engine as it comes.
    chunk_bytes: int = 48 * 1024
    chunk_delay: float = 0.1
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
    # How often engines_url (the orchestrator's engine list) is asked.
    engines_refresh: float = 10
    write_timeout: float = 30
    max_reconnects: int = 5
    max_streams: int = 100
    # One core sends a 4 Mbit/s stream to a few thousand players (README's
    # performance section); 2000 such players need 8 Gbit/s, more than most
    # network links carry.  So one stream may take the whole daemon; lower
    # max_clients_per_stream to keep room for others.
    max_clients_per_stream: int = 2000
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
    # HLS (/ace/manifest.m3u8): segments are cut at the video's keyframes
    # once at least hls_target_duration long (a stream whose keyframes lie
    # further apart gets longer ones), and the playlist lists the newest
    # hls_list_size of them.
    hls_target_duration: float = 2
    hls_list_size: int = 4


@attrs.frozen
class Config:
    """
    The whole configuration.  Build it with L{build}, which validates; the
    constructor trusts its arguments.

    @ivar redis: Shared store URL; L{None} keeps state in memory, which suits a
        single daemon.
    @ivar reuse_port: Listen on C{listen}'s TCP port with C{SO_REUSEPORT}, so
        that several workers of one host, sharing C{redis}, share the port.
    @ivar admin_token: Bearer token required by administrative requests;
        with L{None} they are accepted from loopback addresses only.
    @ivar engines_url: An orchestrator's engine list (acestream-orchestrator's
        C{GET /engines}), polled every C{tuning.engines_refresh} seconds for
        engines besides C{engines}; L{None}: the configured engines only.
    @ivar engines_api_key: Sent to C{engines_url} as C{Authorization: Bearer
        KEY}; never shown in the repr or a log line.
    @ivar engines_events: Report the streams' engine sessions to the
        orchestrator's C{events/stream_started} and C{events/stream_ended},
        beside C{engines_url}.
    @ivar channels: What C{GET /playlist.m3u} lists.
    @ivar trusted_proxies: Networks whose C{X-Forwarded-Host} and
        C{X-Forwarded-Proto} the playlist believes.
    """

    listen: str = "tcp:8000"
    reuse_port: bool = False
    # Not in the repr: the URL may carry Redis' password.
    redis: str | None = attrs.field(default=None, repr=False)
    admin_token: str | None = attrs.field(default=None, repr=False)
    #: C{text} (twistd's lines) or C{json}: one JSON object per line with
    #: each event's structured fields, for journald or Loki.
    log_format: str = "text"
    engines: tuple[EngineConfig, ...] = (EngineConfig("127.0.0.1:6878", "http://127.0.0.1:6878"),)
    tuning: Tuning = Tuning()
    engines_url: str | None = None
    # Not in the repr: it is a secret of the orchestrator's.
    engines_api_key: str | None = attrs.field(default=None, repr=False)
    engines_events: bool = False
    channels: tuple[ChannelConfig, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()


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


def build(file_data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """
    Validate C{file_data} (as read by L{load_file}) and C{overrides} (from
    the command line) into a L{Config}.

    Overrides win over the file and the file over the defaults.  An override
    that is L{None} or, for C{engines}, empty was not given.  Override
    C{engines} are L{EngineConfig}s and replace the file's engines entirely,
    because merging two lists of engines would be guesswork.
    """
    config = assemble(file_data, overrides)
    check_listen(config.listen)
    return config


def assemble(file_data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """
    L{build} but for the check of C{listen}, which parses the endpoint
    description and so imports Twisted's endpoints, and with them the TLS
    stack if it is importable: for a caller that decides what the process
    imports first (L{acestream_proxy.tap}).  Follow it with L{check_listen}.
    """
    _reject_unknown(file_data, _names(Config), "")
    given = {k: v for k, v in (overrides or {}).items() if v is not None and v != []}
    _reject_unknown(given, _names(Config) - {"tuning"}, "", what="override")
    values = {**file_data, **given}
    kwargs: dict[str, Any] = {}
    if "listen" in values:
        kwargs["listen"] = _non_empty_string(values["listen"], "listen")
    if "reuse_port" in values:
        kwargs["reuse_port"] = values["reuse_port"]
    if "redis" in values:
        kwargs["redis"] = _redis_url(values["redis"])
    if "admin_token" in values:
        kwargs["admin_token"] = _non_empty_string(values["admin_token"], "admin_token")
    if "engines_url" in values:
        kwargs["engines_url"] = _orchestrator_url(values["engines_url"])
    if "engines_api_key" in values:
        kwargs["engines_api_key"] = _api_key(values["engines_api_key"])
    if "engines_events" in values:
        kwargs["engines_events"] = values["engines_events"]
        if not isinstance(kwargs["engines_events"], bool):
            raise ConfigError(
                f"engines_events: expected true or false, got {_show(values['engines_events'])}"
            )
    if "log_format" in values:
        kwargs["log_format"] = _log_format(values["log_format"])
    if "engines" in given:
        kwargs["engines"] = tuple(given["engines"])
    elif "engines" in file_data:
        kwargs["engines"] = _file_engines(file_data["engines"])
    elif "engines_url" in kwargs:
        # The orchestrator names the engines; the default local engine is
        # not assumed besides them.
        kwargs["engines"] = ()
    if "tuning" in file_data:
        kwargs["tuning"] = _tuning(file_data["tuning"])
    if "channels" in values:
        kwargs["channels"] = file_channels(values["channels"])
    if "trusted_proxies" in values:
        kwargs["trusted_proxies"] = trusted_networks(values["trusted_proxies"])
    config = Config(**kwargs)
    if config.engines or config.engines_url is None:
        _check_engine_ids(config.engines)
    if config.engines_api_key is not None and config.engines_url is None:
        raise ConfigError("engines_api_key: needs engines_url")
    if config.engines_events and config.engines_url is None:
        raise ConfigError("engines_events: needs engines_url")
    _check_reuse_port(config.reuse_port, config.listen, config.redis)
    return config


#: The values of C{log_format}.
LOG_FORMATS = ("text", "json")


def _log_format(value: Any) -> str:
    if value not in LOG_FORMATS:
        raise ConfigError(f"log_format: expected \"text\" or \"json\", got {_show(value)}")
    return value


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
        raise ConfigError(f"{key}: not an http(s) URL with host and port: {_show(url)}")
    return EngineConfig(
        id=normal.split("://", 1)[1] if id is None else id,
        url=normal,
        forwarded=forwarded,
    )


def _orchestrator_url(value: Any) -> str:
    """
    An http(s) URL with a host, and a path and query if need be (the
    orchestrator's engine list is not at its root); no credentials, which
    belong in C{engines_api_key}, out of the URL and so out of log lines.
    """
    if isinstance(value, str) and _is_plain(value) and "#" not in value:
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            parts = port = None
        if (
            parts is not None
            and parts.scheme.lower() in _DEFAULT_PORTS
            and parts.hostname
            and "@" not in parts.netloc
            and port != 0
        ):
            return value
    if isinstance(value, str) and "@" in value:
        value = value.split("://", 1)[0] + "://***@" + value.rpartition("@")[2]
    raise ConfigError(
        f"engines_url: expected an http(s) URL with a host and no credentials, got {_show(value)}"
    )


def _api_key(value: Any) -> str:
    """
    A non-empty header value on one line: anything else would split the
    request head.  The key itself is never shown.
    """
    if not isinstance(value, str) or not value or not all(" " <= c <= "~" for c in value):
        raise ConfigError("engines_api_key: expected a non-empty string of printable ASCII")
    return value


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
        raise ConfigError(f"engines: expected an array of tables ([[engines]]), got {_show(value)}")
    return tuple(_file_engine(item, f"engines[{i}]") for i, item in enumerate(value))


def _file_engine(value: Any, key: str) -> EngineConfig:
    table = _table(value, key)
    _reject_unknown(table, _names(EngineConfig), f"{key}.")
    if "url" not in table:
        raise ConfigError(f"{key}.url: missing")
    forwarded = table.get("forwarded", False)
    if not isinstance(forwarded, bool):
        raise ConfigError(f"{key}.forwarded: expected true or false, got {_show(forwarded)}")
    engine_id = table.get("id")
    if engine_id is not None:
        _non_empty_string(engine_id, f"{key}.id")
    return engine_from_url(table["url"], forwarded=forwarded, id=engine_id, key=f"{key}.url")


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
    if tuning.buffer_bytes < MIN_BUFFER_BYTES:
        raise ConfigError(
            f"tuning.buffer_bytes: must be at least {MIN_BUFFER_BYTES} (one chunk),"
            f" got {tuning.buffer_bytes}"
        )
    if tuning.max_buffer_bytes < tuning.buffer_bytes:
        raise ConfigError(
            f"tuning.max_buffer_bytes: must be at least tuning.buffer_bytes"
            f" ({tuning.buffer_bytes}), got {tuning.max_buffer_bytes}"
        )
    if not MIN_HLS_TARGET <= tuning.hls_target_duration <= MAX_HLS_TARGET:
        raise ConfigError(
            f"tuning.hls_target_duration: must be from {MIN_HLS_TARGET:g} to"
            f" {MAX_HLS_TARGET:g} seconds, got {tuning.hls_target_duration:g}"
        )
    if not MIN_HLS_LIST <= tuning.hls_list_size <= MAX_HLS_LIST:
        raise ConfigError(
            f"tuning.hls_list_size: must be from {MIN_HLS_LIST} to {MAX_HLS_LIST},"
            f" got {tuning.hls_list_size}"
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
