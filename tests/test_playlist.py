"""
Tests of the playlist: C{[[channels]]} and C{trusted_proxies} in the
configuration, and C{GET /playlist.m3u} over real sockets, its URLs built
from C{Host}, or from C{X-Forwarded-*} sent by a trusted proxy only.
"""

import ipaddress
import pathlib
import re
import textwrap
import tomllib

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from acestream_proxy.channels import ChannelConfig, client_is_trusted
from acestream_proxy.config import Config, Tuning, build, load_file
from acestream_proxy.config_checks import ConfigError
from acestream_proxy.http.playlist import render_m3u
from acestream_proxy.options import Options

from .rawplayer import RawPlayer
from .support import HASHES, RunningProxy, eventually, serve

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "systemd" / "aceproxy.toml.example"
ONE, TWO, THREE = HASHES[0], HASHES[1], HASHES[2]

CHANNELS = [
    {
        "name": "Sport One",
        "id": ONE.upper(),
        "group": "Sport",
        "logo": "http://logos.example/1.png",
        "tvg_id": "sport1.example",
    },
    {"name": "News, live", "infohash": TWO},
    {"name": "Film\u00a0«4K»", "id": THREE, "group": "Films"},
]
LOGO = "http://logos.example/1.png"


def channel(**fields) -> dict:
    """A valid channel table, changed by C{fields} (L{None} removes one)."""
    table = {"name": "A", "id": ONE, **fields}
    return {name: value for name, value in table.items() if value is not None}


def error_of(file_data) -> str:
    with pytest.raises(ConfigError) as info:
        build(file_data, {})
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


# --- configuration ------------------------------------------------------------


def test_channels_and_trusted_proxies_default_to_none():
    config = build({}, {})
    assert config.channels == ()
    assert config.trusted_proxies == ()


def test_channels_from_the_file():
    trusted = ["10.0.0.0/8", "::1", "192.0.2.7"]
    config = build({"channels": CHANNELS, "trusted_proxies": trusted})
    assert config.channels == (
        ChannelConfig("Sport One", ONE, "id", "Sport", LOGO, "sport1.example"),
        ChannelConfig("News, live", TWO, "infohash"),
        ChannelConfig("Film\u00a0«4K»", THREE, "id", "Films"),
    )
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.0.2.7/32"),
    )


@pytest.mark.parametrize(
    "channels, expected",
    [
        ({"name": "x"}, "channels: expected an array of tables ([[channels]]), got {'name'"),
        (["x"], 'channels[0]: expected a table, got "x"'),
        ([channel(id=None)], "channels[0]: give exactly one of id and infohash"),
        ([channel(infohash=TWO)], "channels[0]: give exactly one of id and infohash"),
        ([channel(id="abc")], 'channels[0].id: expected 40 hexadecimal characters, got "abc"'),
        (
            [channel(id=None, infohash=ONE + "0")],
            "channels[0].infohash: expected 40 hexadecimal characters",
        ),
        ([channel(id=12)], "channels[0].id: expected 40 hexadecimal characters, got 12"),
        ([channel(name=None)], "channels[0].name: missing"),
        ([channel(name="")], 'channels[0].name: expected a non-empty string, got ""'),
        ([channel(name="  ")], "channels[0].name: expected a non-empty string"),
        ([channel(name="A\nhttp://evil")], "channels[0].name: must not contain line breaks"),
        ([channel(), channel(group='Sp"ort')], "channels[1].group: must not contain double quotes"),
        ([channel(logo="http://x/\r\n1.png")], "channels[0].logo: must not contain"),
        ([channel(tvg_id="a\u2028b")], "channels[0].tvg_id: must not contain"),
        ([channel(name="A\x00")], "channels[0].name: must not contain"),
        ([channel(tvg_id="")], 'channels[0].tvg_id: expected a non-empty string, got ""'),
        ([channel(tvg_id=3)], "channels[0].tvg_id: expected a non-empty string, got 3"),
        ([channel(**{"tvg-id": "x"})], "unknown key: channels[0].tvg-id"),
        ([channel(url="x")], "unknown key: channels[0].url"),
    ],
)
def test_channel_mistakes(channels, expected):
    assert error_of({"channels": channels}).startswith(expected)


@pytest.mark.parametrize(
    "trusted, expected",
    [
        ("10.0.0.0/8", "trusted_proxies: expected a list of IP addresses or networks, got"),
        ([8], "trusted_proxies[0]: expected an IP address or network, got 8"),
        (["10.0.0.0/8", "a.b"], 'trusted_proxies[1]: not an IP address or network: "a.b"'),
        (
            ["10.0.0.1/8"],
            'trusted_proxies[0]: not an IP address or network: "10.0.0.1/8" (host bits set)',
        ),
        (["10.0.0.0/33"], 'trusted_proxies[0]: not an IP address or network: "10.0.0.0/33"'),
        ([" 10.0.0.1"], 'trusted_proxies[0]: not an IP address or network: " 10.0.0.1"'),
    ],
)
def test_trusted_proxies_mistakes(trusted, expected):
    assert error_of({"trusted_proxies": trusted}).startswith(expected)


def test_trusted_client_addresses():
    networks = build({"trusted_proxies": ["10.0.0.0/8", "2001:db8::/32"]}).trusted_proxies
    assert client_is_trusted("10.1.2.3", networks)
    assert client_is_trusted("::ffff:10.1.2.3", networks)
    assert client_is_trusted("2001:db8::5", networks)
    assert not client_is_trusted("11.0.0.1", networks)
    assert not client_is_trusted("/run/aceproxy.sock", networks)
    assert not client_is_trusted("10.1.2.3", ())


def test_example_file_documents_the_playlist_settings():
    text = EXAMPLE.read_text(encoding="utf-8")
    assert re.search(r"^trusted_proxies = \[\]$", text, re.MULTILINE)
    # The commented [[channels]] example, uncommented, is a valid channel.
    block = re.search(r"^# \[\[channels\]\]\n((?:#   .*\n)+)", text, re.MULTILINE)
    assert block is not None
    channel = tomllib.loads(re.sub(r"^#   ", "", block[1], flags=re.MULTILINE))
    assert build({"channels": [channel]}).channels[0].name


def test_readme_example_is_a_working_configuration():
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    section = readme.split("\nPlaylists\n---------\n", 1)[1]
    block = re.search(r"\.\. code-block:: toml\n\n((?:    .*\n|\n)+)", section)
    config = build(tomllib.loads(textwrap.dedent(block[1])), {})
    assert len(config.channels) >= 2
    assert {channel.param for channel in config.channels} == {"id", "infohash"}
    assert config.trusted_proxies
    # The playlist shown under it is what the proxy writes.
    shown = re.search(r"asked as ``(http://[^/]+)/playlist.m3u``::\n\n((?:    .*\n)+)", section)
    assert render_m3u(config.channels, shown[1]) == textwrap.dedent(shown[2]).encode()


# --- GET /playlist.m3u ----------------------------------------------------------


@pytest.fixture
def proxies(engine):
    started = []

    async def start(config: Config) -> RunningProxy:
        config = Config(
            listen="tcp:0:interface=127.0.0.1",
            engines=(engine.config("engine-a"),),
            tuning=Tuning(),
            channels=config.channels,
            trusted_proxies=config.trusted_proxies,
        )
        proxy = await serve(config)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        pytest_twisted.blockon(proxy.stop())


async def get(proxy: RunningProxy, head: bytes, method: bytes = b"GET",
              version: bytes = b"HTTP/1.1") -> tuple[int, dict, bytes]:
    """
    Send one request with the header lines C{head} (C{Connection: close}
    added) on a plain socket; status, headers and body of the answer.
    """
    request = b"%s /playlist.m3u %s\r\n%sConnection: close\r\n\r\n" % (method, version, head)
    client = RawPlayer(request=request)
    port = proxy.port.getHost().port
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await eventually(lambda: client.closed, what="the answer")
    status, *lines = client.head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status.split()[1]), headers, client.body()


def expected_playlist(base: str) -> bytes:
    return (
        "#EXTM3U\n"
        '#EXTINF:-1 tvg-id="sport1.example" tvg-logo="http://logos.example/1.png"'
        ' group-title="Sport",Sport One\n'
        f"{base}/ace/getstream?id={ONE}\n"
        "#EXTINF:-1,News, live\n"
        f"{base}/ace/getstream?infohash={TWO}\n"
        '#EXTINF:-1 group-title="Films",Film\u00a0«4K»\n'
        f"{base}/ace/getstream?id={THREE}\n"
    ).encode("utf-8")


@pytest_twisted.ensureDeferred
async def test_playlist_uses_the_host_header(proxies):
    proxy = await proxies(build({"channels": CHANNELS}))
    status, headers, body = await get(proxy, b"Host: tv.example:8000\r\n")
    assert status == 200
    assert headers["content-type"] == "audio/x-mpegurl"
    assert body == expected_playlist("http://tv.example:8000")


@pytest_twisted.ensureDeferred
async def test_playlist_head_has_no_body(proxies):
    proxy = await proxies(build({"channels": CHANNELS}))
    status, headers, body = await get(proxy, b"Host: tv.example\r\n", method=b"HEAD")
    assert (status, headers["content-type"], body) == (200, "audio/x-mpegurl", b"")


@pytest_twisted.ensureDeferred
async def test_empty_playlist(proxies):
    proxy = await proxies(Config())
    status, _, body = await get(proxy, b"Host: [::1]:8000\r\n")
    assert (status, body) == (200, b"#EXTM3U\n")


@pytest_twisted.ensureDeferred
async def test_forwarded_headers_from_a_trusted_proxy(proxies):
    proxy = await proxies(build({"channels": CHANNELS, "trusted_proxies": ["127.0.0.0/8"]}))
    status, _, body = await get(
        proxy,
        b"Host: 127.0.0.1:8000\r\nX-Forwarded-Host: tv.example, inner.example\r\n"
        b"X-Forwarded-Proto: HTTPS\r\n",
    )
    assert status == 200
    assert body == expected_playlist("https://tv.example")
    # Either header alone replaces only its part.
    _, _, body = await get(proxy, b"Host: 127.0.0.1:8000\r\nX-Forwarded-Proto: https\r\n")
    assert body == expected_playlist("https://127.0.0.1:8000")
    _, _, body = await get(proxy, b"Host: 127.0.0.1:8000\r\nX-Forwarded-Host: tv.example:81\r\n")
    assert body == expected_playlist("http://tv.example:81")


@pytest_twisted.ensureDeferred
async def test_forwarded_headers_from_anyone_else_are_ignored(proxies):
    proxy = await proxies(build({"channels": CHANNELS, "trusted_proxies": ["10.0.0.0/8", "::1"]}))
    status, _, body = await get(
        proxy,
        b"Host: tv.example:8000\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n",
    )
    assert status == 200
    assert body == expected_playlist("http://tv.example:8000")
    # Garbage in them is ignored too: they are not read at all.
    status, _, body = await get(
        proxy, b"Host: tv.example:8000\r\nX-Forwarded-Host: a b\"c\r\nX-Forwarded-Proto: gopher\r\n"
    )
    assert (status, body) == (200, expected_playlist("http://tv.example:8000"))


@pytest_twisted.ensureDeferred
async def test_bad_forwarded_headers_from_a_trusted_proxy(proxies):
    proxy = await proxies(build({"channels": CHANNELS, "trusted_proxies": ["127.0.0.1"]}))
    for head, message in [
        (b"X-Forwarded-Host: a b\r\n", "X-Forwarded-Host is not a valid host[:port]"),
        (b"X-Forwarded-Proto: gopher\r\n", "X-Forwarded-Proto must be http or https"),
    ]:
        status, headers, body = await get(proxy, b"Host: tv.example\r\n" + head)
        assert status == 400
        assert headers["content-type"] == "application/json"
        assert body == b'{"error": "%s"}\n' % message.encode()


@pytest_twisted.ensureDeferred
async def test_without_host_the_listening_address_stands_in(proxies):
    proxy = await proxies(build({"channels": CHANNELS}))
    port = proxy.port.getHost().port
    status, _, body = await get(proxy, b"", version=b"HTTP/1.0")
    assert status == 200
    assert body == expected_playlist(f"http://127.0.0.1:{port}")


@pytest.mark.parametrize(
    "host",
    [
        b"tv.example:",
        b"tv.example:99999",
        b"tv.example:0",
        b"tv example",
        b'tv.example"',
        b"user@tv.example",
        b"tv.example/path",
        b"[::1",
        b"[not:an:address:zz]",
        b"",
        b"tv.example\xff",
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_host_is_a_json_400(proxies, host):
    proxy = await proxies(build({"channels": CHANNELS}))
    status, headers, body = await get(proxy, b"Host: %s\r\n" % host)
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    assert body.startswith(b'{"error": ')


@pytest_twisted.ensureDeferred
async def test_host_given_twice_is_a_json_400(proxies):
    proxy = await proxies(build({"channels": CHANNELS}))
    status, _, body = await get(proxy, b"Host: a.example\r\nHost: b.example\r\n")
    assert (status, body) == (400, b'{"error": "Host given more than once"}\n')


@pytest_twisted.ensureDeferred
async def test_channels_from_a_config_file_reach_the_playlist(proxies, tmp_path):
    path = tmp_path / "aceproxy.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            trusted_proxies = ["127.0.0.1"]

            [[channels]]
            name = "One"
            id = "{ONE}"
            group = "G"
            """
        ),
        encoding="utf-8",
    )
    options = Options()
    options.parseOptions(["--config", str(path)])
    assert options.config == build(load_file(str(path)), {})
    proxy = await proxies(options.config)
    _, _, body = await get(proxy, b"Host: h\r\nX-Forwarded-Host: tv.example\r\n")
    assert body == (
        f'#EXTM3U\n#EXTINF:-1 group-title="G",One\nhttp://tv.example/ace/getstream?id={ONE}\n'
    ).encode()
