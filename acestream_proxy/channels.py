"""
The playlist's settings: the channels of C{[[channels]]} and the
C{trusted_proxies} whose C{X-Forwarded-*} headers are believed, checked
into values with one-line L{ConfigError}s that name the key.

They live apart from L{acestream_proxy.config} because only the playlist
reads them; the configuration merely carries them.
"""

import ipaddress
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import attrs

from .config_checks import ConfigError, _show

_HASH = re.compile(r"[0-9a-fA-F]{40}")
_CHANNEL_KEYS = frozenset({"name", "id", "infohash", "group", "logo", "tvg_id"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class ChannelConfig:
    """
    One channel of the playlist.

    @ivar name: What players show; the text after the comma of C{#EXTINF}.
    @ivar key: The content's 40 hexadecimal digits, in lower case (the
        stream key the proxy uses).
    @ivar param: C{"id"} or C{"infohash"}: which one the file gave, and so
        which parameter the playlist's URL carries, since the engine is
        asked with the parameter the player used.
    @ivar group: C{group-title}, or L{None} to leave it out.
    @ivar logo: C{tvg-logo}, or L{None}.
    @ivar tvg_id: C{tvg-id}, or L{None}.
    """

    name: str
    key: str
    param: str = "id"
    group: str | None = None
    logo: str | None = None
    tvg_id: str | None = None


def file_channels(value: Any) -> tuple[ChannelConfig, ...]:
    """The C{[[channels]]} array of tables, checked."""
    if not isinstance(value, list):
        raise ConfigError(
            f"channels: expected an array of tables ([[channels]]), got {_show(value)}"
        )
    return tuple(_channel(item, f"channels[{i}]") for i, item in enumerate(value))


def _channel(value: Any, key: str) -> ChannelConfig:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table, got {_show(value)}")
    for name in value:
        if name not in _CHANNEL_KEYS:
            shown = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _show(name)
            raise ConfigError(f"unknown key: {key}.{shown}")
    given = [param for param in ("id", "infohash") if param in value]
    if len(given) != 1:
        raise ConfigError(f"{key}: give exactly one of id and infohash")
    param = given[0]
    content = value[param]
    if not isinstance(content, str) or not _HASH.fullmatch(content):
        raise ConfigError(
            f"{key}.{param}: expected 40 hexadecimal characters, got {_show(content)}"
        )
    if "name" not in value:
        raise ConfigError(f"{key}.name: missing")
    name = value["name"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{key}.name: expected a non-empty string, got {_show(name)}")
    if _has_control(name):
        # A line break would end the #EXTINF line and make the rest a URL.
        raise ConfigError(
            f"{key}.name: must not contain line breaks or control characters, got {_show(name)}"
        )
    return ChannelConfig(
        name=name,
        key=content.lower(),
        param=param,
        group=_attribute(value, "group", key),
        logo=_attribute(value, "logo", key),
        tvg_id=_attribute(value, "tvg_id", key),
    )


def _attribute(table: Mapping[str, Any], name: str, key: str) -> str | None:
    """
    An C{#EXTINF} attribute's value.  It is written between double quotes,
    which M3U cannot escape: a quote or a line break in it would end the
    attribute or the line, so it is refused rather than mangled.
    """
    if name not in table:
        return None
    value = table[name]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}.{name}: expected a non-empty string, got {_show(value)}")
    if '"' in value or _has_control(value):
        raise ConfigError(
            f"{key}.{name}: must not contain double quotes, line breaks or control"
            f" characters, got {_show(value)}"
        )
    return value


def _has_control(text: str) -> bool:
    """
    Control characters (tabs and line breaks among them) and Unicode's line
    and paragraph separators, which some players take for line ends.
    """
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def trusted_networks(value: Any) -> tuple[Network, ...]:
    """
    C{trusted_proxies}: IP addresses (a network of one) and CIDR networks.
    A network with host bits set (C{10.0.0.1/8}) is refused, since it is
    more likely a typo than a wish for C{10.0.0.0/8}.
    """
    if not isinstance(value, list):
        raise ConfigError(
            f"trusted_proxies: expected a list of IP addresses or networks, got {_show(value)}"
        )
    networks = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(
                f"trusted_proxies[{i}]: expected an IP address or network, got {_show(item)}"
            )
        try:
            network = ipaddress.ip_network(item)
        except ValueError as err:
            reason = " (host bits set)" if "host bits set" in str(err) else ""
            raise ConfigError(
                f"trusted_proxies[{i}]: not an IP address or network: {_show(item)}{reason}"
            ) from None
        networks.append(network)
    return tuple(networks)


def client_is_trusted(host: str, networks: tuple[Network, ...]) -> bool:
    """
    Whether a client's address lies in one of C{networks}.  An IPv4 client
    seen by a dual-stack listener as C{::ffff:a.b.c.d} counts as its IPv4
    address; anything that is not an IP address (a UNIX socket) is not
    trusted.
    """
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    return any(address in network for network in networks)
