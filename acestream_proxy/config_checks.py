"""
Checks of the addresses a configuration names, the endpoint to listen on
and the Redis URL, and the one-line L{ConfigError} every configuration
mistake is reported with.
"""

import json
import re
import socket
from typing import Any
from urllib.parse import parse_qsl, urlsplit

REDIS_SHAPE = (
    "redis://[[user]:password@]host[:port][/db],"
    " rediss://[[user]:password@]host[:port][/db][?ssl_ca_certs=PATH]"
    " or unix:///path[?db=N]"
)


# Counts for which zero is meaningful: start at the live edge, never reconnect,
# no limit per client address (behind a reverse proxy on another machine,
# every client has its address).
class ConfigError(Exception):
    """
    A configuration mistake, described in one line that names the key.

    Line breaks coming from other libraries' messages are folded, so that the
    text always fits the single line twistd prints before exiting.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in message.splitlines()))


def _show(value: Any) -> str:
    """A value as it could appear in TOML, escaped to stay on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    return repr(value)


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


def check_listen(listen: str) -> None:
    """
    Parse the endpoint description now (parsing does not listen) so that a
    typo is reported at startup with the key's name.

    A C{systemd:} endpoint only resolves under socket activation, so only
    its arguments are checked; the descriptor is looked up when listening.
    (Asking L{twisted.python.systemd.ListenFDs} here is no option: reading
    the environment consumes it.)

    The reactor and Twisted's endpoints are imported here, not with this
    module: the daemon decides whether it loads TLS before they are
    (L{acestream_proxy.tap.forgo_tls_unless_needed}).
    """
    if listen.split(":", 1)[0].lower() == "systemd":
        _check_systemd_listen(listen)
        return
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, listen)
    except Exception as err:
        raise ConfigError(
            f"listen: not a valid endpoint description: {_show(listen)} ({err})"
        ) from None


#: The endpoint types a shared port applies to, as C{listen} names them.
TCP_TYPES = ("tcp", "tcp6")


def is_tcp(description: str) -> bool:
    """
    Whether the endpoint description C{description} is a TCP one.
    """
    return description.split(":", 1)[0].lower() in TCP_TYPES


def _check_reuse_port(reuse_port: Any, listen: str, redis: str | None) -> None:
    """
    A shared port is for several workers of one host: it needs a TCP
    endpoint to bind, and Redis, without which each worker would open its
    own engine session for the same stream.  (Under socket activation the
    workers share systemd's socket instead.)
    """
    if not isinstance(reuse_port, bool):
        raise ConfigError(f"reuse_port: expected true or false, got {_show(reuse_port)}")
    if not reuse_port:
        return
    if not is_tcp(listen):
        raise ConfigError(
            f"reuse_port: applies to a tcp: listen endpoint only, not {_show(listen)}"
        )
    if redis is None:
        raise ConfigError(
            "reuse_port: needs redis: workers sharing a port must share their streams,"
            " or each would open its own engine session"
        )
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("reuse_port: this system has no SO_REUSEPORT")


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
        raise ConfigError(f"listen: not a valid endpoint description: {_show(listen)} ({problem})")
