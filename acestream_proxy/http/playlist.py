"""
C{GET /playlist.m3u}: the configured channels as an M3U playlist whose URLs
point at this proxy.

The URLs must name the proxy as the player reached it, so their host is
the request's C{Host}.  Behind a reverse proxy that is the reverse proxy's
own view, so C{X-Forwarded-Host} and C{X-Forwarded-Proto} are taken
instead, but only from the addresses in C{trusted_proxies}: anyone else
could use them to make the playlist point players elsewhere.
"""

import ipaddress
import re

import attrs

from ..channels import ChannelConfig, Network, client_is_trusted
from ..errors import BadRequest

CONTENT_TYPE = b"audio/x-mpegurl"

#: A host as it may stand in a URL we write: a DNS name or IPv4 address, or
#: an IPv6 address in brackets, then an optional port.  Narrower than RFC
#: 3986's reg-name on purpose: nothing that would need escaping in a URL or
#: could break out of a playlist line gets through.
_HOST = re.compile(
    r"(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


@attrs.frozen
class Playlist:
    """
    The channels and whom to believe about the proxy's public address.
    """

    channels: tuple[ChannelConfig, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()

    def render(self, request) -> bytes:
        """
        The playlist for C{request}, with its headers set.
        """
        base = base_url(request, self.trusted_proxies)
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        # It lists settings, not live state, but its URLs depend on the
        # Host the client used.
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Vary", b"Host, X-Forwarded-Host, X-Forwarded-Proto")
        return render_m3u(self.channels, base)


def render_m3u(channels: tuple[ChannelConfig, ...], base: str) -> bytes:
    """
    C{#EXTM3U}, then per channel its C{#EXTINF} line and its URL on this
    proxy.  Attributes that are not configured are left out rather than
    written empty, which some players would show as a group or logo.
    """
    lines = ["#EXTM3U"]
    for channel in channels:
        attributes = "".join(
            f' {name}="{value}"'
            for name, value in (
                ("tvg-id", channel.tvg_id),
                ("tvg-logo", channel.logo),
                ("group-title", channel.group),
            )
            if value is not None
        )
        lines.append(f"#EXTINF:-1{attributes},{channel.name}")
        lines.append(f"{base}/ace/getstream?{channel.param}={channel.key}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def base_url(request, trusted_proxies: tuple[Network, ...]) -> str:
    """
    C{scheme://host[:port]} of this proxy as the client reached it.

    - From an address in C{trusted_proxies}, the first value of
      C{X-Forwarded-Host} and of C{X-Forwarded-Proto} (the client-facing
      ones when several proxies appended theirs) win, each when present.
    - Otherwise the host is the request's C{Host}, and the scheme is
      C{https} on a TLS connection, else C{http}.
    - Without a C{Host} (an HTTP/1.0 client), the address the connection
      arrived on stands in: it is where this client reached the proxy.

    A host that is malformed, or given twice, is a C{400}: it cannot be put
    in a URL, and guessing another could send players to the wrong place.
    """
    scheme = "https" if request.isSecure() else "http"
    host = _single_header(request, b"host", "Host")
    client = getattr(request.getClientAddress(), "host", "")
    if client_is_trusted(client, trusted_proxies):
        forwarded_host = _first_forwarded(request, b"x-forwarded-host")
        if forwarded_host is not None:
            host = _checked_host(forwarded_host, "X-Forwarded-Host")
        forwarded_proto = _first_forwarded(request, b"x-forwarded-proto")
        if forwarded_proto is not None:
            if forwarded_proto.lower() not in ("http", "https"):
                raise BadRequest("X-Forwarded-Proto must be http or https")
            scheme = forwarded_proto.lower()
    if host is None:
        host = _local_host(request)
    return f"{scheme}://{host}"


def _single_header(request, name: bytes, shown: str) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{shown} given more than once")
    return _checked_host(values[0].decode("latin-1").strip(), shown)


def _first_forwarded(request, name: bytes) -> str | None:
    """
    The first comma-separated value of every C{name} header, or L{None}.
    """
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    first = values[0].decode("latin-1").split(",", 1)[0].strip()
    return first or None


def _checked_host(value: str, shown: str) -> str:
    match = _HOST.fullmatch(value)
    ok = match is not None
    if ok and match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            ok = False
    if ok and match["port"] is not None and not 0 < int(match["port"]) < 65536:
        ok = False
    if not ok:
        raise BadRequest(f"{shown} is not a valid host[:port]")
    return value


def _local_host(request) -> str:
    """The address and port the connection arrived on, as a URL's host."""
    local = request.getHost()
    address = getattr(local, "host", None)
    if address is None:
        raise BadRequest("a Host header is required")
    if ":" in address:
        address = f"[{address}]"
    return f"{address}:{local.port}"
