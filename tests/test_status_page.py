"""
The status page at C{GET /}, rendered by a real headless Chromium against a
real proxy streaming from the simulated engine: an admin sees the playing
stream with its engine and players; anyone else sees the engines and the
totals, and no stream key.  Its player plays the demo's H.264 broadcast in
Chromium's own C{<video>} element, from the proxy's HLS playlist.
"""

import json
import os
import re
import shutil
import signal
import tempfile
from contextlib import asynccontextmanager
from html.parser import HTMLParser

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater

from acestream_proxy.http.status import CONTENT_SECURITY_POLICY
from acestream_proxy.testing import demo_media
from acestream_proxy.testing.source import load

from .support import HASHES, Player, start_engine

KEY = HASHES[0]
TOKEN = "status-page-admin-token"
CHROMIUM_SECONDS = 90
#: Chromium's flags for every run: headless, nothing from the network but
#: the page, and muted video allowed to start without a click.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
#: How long the page's video may take to show its first picture: the
#: proxy's playlist needs a few whole segments (a second each) first.
VIDEO_SECONDS = 30


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
        *CHROMIUM_FLAGS,
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


class _DevTools(ProcessProtocol):
    """
    Chromium driven through the DevTools protocol over a pipe
    (C{--remote-debugging-pipe}): each message is JSON ended by a NUL,
    commands go to the child's fd 3 and answers and events come from its
    fd 4.  Unlike C{--dump-dom}, whose virtual time runs ahead of a video's
    real clock, the page keeps running for as long as the test asks it
    questions; and no websocket client is needed.
    """

    COMMANDS, ANSWERS = 3, 4

    def __init__(self) -> None:
        self.err = bytearray()
        self.done = Deferred()
        self._buffer = b""
        self._last_id = 0
        self._waiting: dict[int, Deferred] = {}
        self._events: dict[str, list[Deferred]] = {}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self.err += data
        elif fd == self.ANSWERS:
            self._buffer += data
            *messages, self._buffer = self._buffer.split(b"\0")
            for message in messages:
                message = json.loads(message)
                if "id" in message:
                    self._waiting.pop(message["id"]).callback(message)
                else:
                    for event in self._events.pop(message["method"], []):
                        event.callback(message["params"])

    def processEnded(self, reason) -> None:
        waiting, self._waiting = self._waiting, {}
        events, self._events = self._events, {}
        for answer in [*waiting.values(), *(d for ds in events.values() for d in ds)]:
            answer.errback(AssertionError("Chromium ended: " + self.stderr()))
        self.done.callback(reason.value.exitCode)

    def next_event(self, method: str) -> Deferred:
        """Fire with the parameters of the next event C{method}."""
        event = Deferred()
        self._events.setdefault(method, []).append(event)
        return event

    def stderr(self) -> str:
        return self.err.decode(errors="replace")[-2000:]

    async def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and return its result; an error fails the test."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        answer = Deferred()
        self._waiting[self._last_id] = answer
        self.transport.writeToChild(self.COMMANDS, json.dumps(message).encode() + b"\0")
        answered = await answer
        assert "error" not in answered, (method, answered["error"])
        return answered["result"]


class _Page:
    """One tab of a L{_DevTools} Chromium, asked questions in JavaScript."""

    def __init__(self, browser: _DevTools, session: str) -> None:
        self.browser = browser
        self.session = session

    async def evaluate(self, expression: str):
        """
        The value of C{expression} in the page, as JSON makes it; run as
        if the user had clicked (C{userGesture}), as a test's clicks stand
        for theirs.
        """
        result = await self.browser.call(
            "Runtime.evaluate",
            self.session,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
            userGesture=True,
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        """
        The first true value of C{expression}, asked ten times a second, on
        the real reactor (the proxy under test shares it); after
        C{timeout} seconds the test fails with the player's state line.
        """
        for _ in range(int(timeout * 10)):
            value = await self.evaluate(expression)
            if value:
                return value
            await deferLater(reactor, 0.1, lambda: None)
        state = await self.evaluate("document.getElementById('player-state').textContent")
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; player: {state!r}")


@asynccontextmanager
async def chromium_page(url: str, before_scripts: str | None = None):
    """
    A headless Chromium with C{url} open in a tab, as a L{_Page}, closed at
    the end.  C{before_scripts}, if given, runs in the page before any of
    its own scripts.
    """
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: `make test` installs it"
    profile = tempfile.mkdtemp(prefix="status-page-chromium-")
    browser = _DevTools()
    args = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": profile}
    process = reactor.spawnProcess(
        browser,
        chromium,
        args,
        env=env,
        childFDs={0: "w", 1: "r", 2: "r", browser.COMMANDS: "w", browser.ANSWERS: "r"},
    )
    timeout = reactor.callLater(CHROMIUM_SECONDS, process.signalProcess, signal.SIGKILL)
    try:
        target = await browser.call("Target.createTarget", url="about:blank")
        attached = await browser.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = _Page(browser, attached["sessionId"])
        if before_scripts is not None:
            await browser.call(
                "Page.addScriptToEvaluateOnNewDocument", page.session, source=before_scripts
            )
        # The page's questions start once it has loaded (its script, which
        # is deferred, has run), not in the blank page it replaces.
        await browser.call("Page.enable", page.session)
        loaded = browser.next_event("Page.loadEventFired")
        await browser.call("Page.navigate", page.session, url=url)
        await loaded
        yield page
        await browser.call("Browser.close")
        assert await browser.done == 0, browser.stderr()
    finally:
        if timeout.active():
            timeout.cancel()
        if not browser.done.called:
            process.signalProcess(signal.SIGKILL)
            await browser.done
        shutil.rmtree(profile, ignore_errors=True)


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


@pytest.fixture(scope="module")
def h264_demo(tmp_path_factory):
    """
    The demo's broadcast in H.264 and AAC, which Chromium plays (it has no
    MPEG-2 decoder), as the simulated engine's source.
    """
    path = tmp_path_factory.mktemp("media") / demo_media.H264.file_name
    demo_media.generate(path, coding=demo_media.H264)
    return load(path)


def video_when(condition: str) -> str:
    """
    An expression whose value is the page's video and player state, once
    C{condition} (JavaScript, on C{video}) holds, else C{null}.
    """
    return f"""(() => {{
      const video = document.getElementById("video");
      const state = document.getElementById("player-state");
      if (!({condition})) return null;
      return {{src: video.getAttribute("src"), hidden: video.hidden,
               readyState: video.readyState, paused: video.paused,
               width: video.videoWidth, height: video.videoHeight, time: video.currentTime,
               state: state.dataset.state, text: state.textContent}};
    }})()"""


async def plays_on(page) -> tuple[dict, dict]:
    """
    The video's state once it shows a picture, and again once it has
    played a further second and a half: proof that the browser decodes
    the stream and that more of it keeps coming.
    """
    first = await page.wait_for(
        video_when(
            "video.readyState >= HTMLMediaElement.HAVE_CURRENT_DATA && video.videoWidth"
            " || video.error"
        ),
        VIDEO_SECONDS,
        "the video's first picture",
    )
    assert first["state"] != "error", first["text"]
    later = await page.wait_for(
        video_when(f"video.currentTime >= {first['time'] + 1.5}"),
        VIDEO_SECONDS,
        "the video to play on",
    )
    return first, later


def assert_playing(first: dict, later: dict) -> None:
    """The demo's picture, playing, from the proxy's playlist of KEY."""
    assert first["src"] == f"/ace/manifest.m3u8?id={KEY}"
    assert not first["hidden"]
    assert (first["width"], first["height"]) == (demo_media.WIDTH, demo_media.HEIGHT)
    assert (later["width"], later["height"]) == (demo_media.WIDTH, demo_media.HEIGHT)
    assert later["time"] >= first["time"] + 1.5 and not later["paused"]
    assert later["state"] == "playing"
    assert later["text"].startswith(f"Playing: {demo_media.WIDTH}×{demo_media.HEIGHT}, ")


@pytest_twisted.ensureDeferred
async def test_an_admin_plays_a_stream_from_its_row(h264_demo, proxy_factory):
    """
    An admin's Play button on a stream's row plays it in the page: the
    C{<video>} element loads the proxy's HLS playlist, shows the demo's
    picture at its size, and plays on.
    """
    running = start_engine(bitrate=h264_demo.bitrate, batch_interval=0.02, source=h264_demo)
    try:
        proxy, player = await streaming(running, proxy_factory)
        async with chromium_page(proxy.url + "/") as page:
            button = f'document.querySelector(\'#streams tr[data-key="{KEY}"] button\')'
            await page.wait_for(button + " !== null", 10, "the stream's row")
            await page.evaluate(button + ".click()")
            first, later = await plays_on(page)
            assert_playing(first, later)
            links = await page.evaluate(
                "[...document.querySelectorAll('#player a')].map((a) => a.getAttribute('href'))"
            )
            assert links == [f"/ace/manifest.m3u8?id={KEY}", f"/ace/getstream?id={KEY}"]
            # Stop lets go of the stream: no source, nothing shown.
            await page.evaluate("document.getElementById('play-stop').click()")
            stopped = await page.evaluate(video_when("true"))
            assert stopped["src"] is None and stopped["state"] == "stopped"
            assert await page.evaluate("document.getElementById('player').hidden") is True
        player.disconnect()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_anyone_plays_a_content_id_they_type(h264_demo, proxy_factory):
    """
    Someone who is not an admin sees no stream, but plays a content id
    they know by typing it: the player needs no token, as VLC needs none.
    An id that is not 40 hex digits is refused before anything is asked.
    """
    running = start_engine(bitrate=h264_demo.bitrate, batch_interval=0.02, source=h264_demo)
    try:
        proxy = await proxy_factory([running.config("engine-a")], admin_token=TOKEN)
        async with chromium_page(proxy.url + "/") as page:
            await page.wait_for(
                "document.getElementById('view').dataset.admin === 'no'", 10, "the page's view"
            )
            assert await page.evaluate("document.getElementById('streams').hidden") is True
            await page.evaluate(
                "document.getElementById('play-id').value = 'not-an-id';"
                "document.getElementById('play-form').requestSubmit()"
            )
            refused = await page.evaluate(video_when("true"))
            assert refused["src"] is None and refused["state"] == "invalid"
            await page.evaluate(
                f"document.getElementById('play-id').value = '{KEY.upper()}';"
                "document.getElementById('play-start').click()"
            )
            first, later = await plays_on(page)
            assert_playing(first, later)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_browser_without_hls_gets_the_links(engine, proxy_factory):
    """
    Where the browser does not play HLS (C{canPlayType} answers C{""}, as
    Firefox does), the page shows no video but the playlist's and the
    stream's links, for VLC or mpv, and asks the proxy for nothing.
    """
    proxy = await proxy_factory([engine.config("engine-a")])
    no_hls = (
        "const canPlay = HTMLMediaElement.prototype.canPlayType;"
        "HTMLMediaElement.prototype.canPlayType = function (type) {"
        "  return /mpegurl/i.test(type) ? '' : canPlay.call(this, type); };"
    )
    async with chromium_page(proxy.url + "/", before_scripts=no_hls) as page:
        await page.wait_for("document.getElementById('view').dataset.admin", 10, "the page")
        await page.evaluate(
            f"document.getElementById('play-id').value = '{KEY}';"
            "document.getElementById('play-start').click()"
        )
        shown = await page.evaluate(video_when("true"))
        assert shown["src"] is None and shown["hidden"] is True
        assert shown["state"] == "unsupported" and "VLC or mpv" in shown["text"]
        assert await page.evaluate("document.getElementById('player').hidden") is False
        links = await page.evaluate(
            "[...document.querySelectorAll('#player a')].map((a) => a.getAttribute('href'))"
        )
        assert links == [f"/ace/manifest.m3u8?id={KEY}", f"/ace/getstream?id={KEY}"]
    assert proxy.registry.streams == {}
