"""
The status page at C{GET /}, rendered by a real headless Chromium against a
real proxy streaming from the simulated engine: an admin sees the playing
stream with its engine and players; anyone else sees the engines and the
totals, and no stream key.
"""

import json
import os
import re
import shutil
import signal
import tempfile
from html.parser import HTMLParser

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from acestream_proxy.http.status import CONTENT_SECURITY_POLICY

from .support import HASHES, Player

KEY = HASHES[0]
TOKEN = "status-page-admin-token"
CHROMIUM_SECONDS = 90


class _Output(ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.done = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.done.callback(reason.value.exitCode)


async def rendered_dom(url: str) -> str:
    """
    The page at C{url} as Chromium's DOM after its scripts ran, from a
    child process: the proxy under test shares this reactor, which must keep
    turning meanwhile.
    """
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: `make test` installs it"
    profile = tempfile.mkdtemp(prefix="status-page-chromium-")
    output = _Output()
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": profile}
    process = reactor.spawnProcess(output, chromium, args, env=env)
    timeout = reactor.callLater(CHROMIUM_SECONDS, process.signalProcess, signal.SIGKILL)
    try:
        code = await output.done
    finally:
        if timeout.active():
            timeout.cancel()
        shutil.rmtree(profile, ignore_errors=True)
    assert code == 0, output.err.decode(errors="replace")[-2000:]
    return output.out.decode()


class _Tables(HTMLParser):
    """
    The rows of each table of the page, by table id: each row a dict of its
    cells' C{data-field} to their text.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.hidden: set[str] = set()
        self.texts: dict[str, str] = {}
        self._table = None
        self._row = None
        self._field = None
        self._id = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
            if "hidden" in attrs:
                self.hidden.add(self._table)
        elif tag == "tr" and self._table and self._in_body:
            self._row = {}
            self.tables[self._table].append(self._row)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "td" and self._row is not None:
            self._field = attrs.get("data-field")
            self._row[self._field] = ""
        elif "id" in attrs and tag == "p":
            self._id = attrs["id"]
            self.texts[self._id] = ""

    _in_body = False

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
            self._in_body = False
        elif tag == "tr":
            self._row = None
        elif tag == "td":
            self._field = None
        elif tag == "p":
            self._id = None

    def handle_data(self, data):
        if self._row is not None and self._field is not None:
            self._row[self._field] += data
        elif self._id is not None:
            self.texts[self._id] += data


def parsed(dom: str) -> _Tables:
    tables = _Tables()
    tables.feed(dom)
    return tables


async def streaming(engine, proxy_factory, **options):
    proxy = await proxy_factory([engine.config("engine-a")], **options)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(100_000)
    return proxy, player


@pytest_twisted.ensureDeferred
async def test_an_admin_sees_the_playing_stream_and_its_engine(engine, proxy_factory):
    # No token configured: loopback, where Chromium runs, is an admin.
    proxy, player = await streaming(engine, proxy_factory)

    page = parsed(await rendered_dom(proxy.url + "/"))

    [stream] = page.tables["streams"]
    assert "streams" not in page.hidden
    assert stream["key"] == KEY
    assert stream["engine"] == "engine-a"
    assert stream["players"] == "1"
    assert stream["status"] == "started" and stream["health"] == "healthy"
    assert stream["reconnects"] == "0"
    for field in ("bitrate_in", "bitrate_out"):
        assert re.fullmatch(r"\d+(\.\d+)? (k|M)bit/s", stream[field]), stream
    assert re.fullmatch(r"\d+:\d\d", stream["uptime"]), stream
    assert page.tables["engines"] == [
        {"id": "engine-a", "health": "healthy", "streams": "1", "forwarded": "no"}
    ]
    assert page.texts["view"].startswith("Admin view")
    assert "1 streams, 1 players" in page.texts["summary"]
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_others_see_the_aggregate_view_only(engine, proxy_factory):
    proxy, player = await streaming(engine, proxy_factory, admin_token=TOKEN)

    for fragment, told in [("", "Aggregate view only"), ("#token=wrong", "not accepted")]:
        dom = await rendered_dom(proxy.url + "/" + fragment)
        page = parsed(dom)
        assert KEY not in dom
        assert page.tables["streams"] == [] and "streams" in page.hidden
        assert page.tables["engines"] == [
            {"id": "engine-a", "health": "healthy", "streams": "1", "forwarded": "no"}
        ]
        assert told in page.texts["view"]
        assert "1 streams, 1 players" in page.texts["summary"]

    # The token, given in the fragment (never sent to the server), is kept
    # for the tab and sent as a bearer token: the stream appears.
    page = parsed(await rendered_dom(proxy.url + "/#token=" + TOKEN))
    [stream] = page.tables["streams"]
    assert (stream["key"], stream["engine"], stream["players"]) == (KEY, "engine-a", "1")
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_page_and_its_json(engine, proxy_factory):
    proxy, player = await streaming(engine, proxy_factory, admin_token=TOKEN)

    for path, kind in [("/", b"text/html"), ("/status.js", b"text/javascript")]:
        response = await treq.get(proxy.url + path)
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(kind)
        assert response.headers.getRawHeaders(b"content-security-policy") == [
            CONTENT_SECURITY_POLICY
        ]
        body = await response.text()
        assert "http://" not in body and "https://" not in body  # nothing from outside
    assert b"default-src 'self'" in CONTENT_SECURITY_POLICY

    response = await treq.get(proxy.url + "/status")
    public = await response.json()
    assert public["admin"] is False and public["streams"] is None
    assert KEY not in json.dumps(public)
    assert public["health"]["players"] == 1

    received = len(player.data)
    response = await treq.get(
        proxy.url + "/status", headers={b"Authorization": [f"Bearer {TOKEN}".encode()]}
    )
    detailed = await response.json()
    [stream] = detailed["streams"]
    assert detailed["admin"] is True and stream["key"] == KEY
    # What the player got had been sent to it; the engine sent at least that.
    assert stream["bytes_out"] >= received > 0
    assert stream["bytes_in"] >= received
    assert 0 <= stream["uptime"] < 60
    player.disconnect()
