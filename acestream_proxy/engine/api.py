"""
Talking to an AceStream engine over its HTTP API with treq: start a playback
session (C{getstream}, JSON format), open its playback body, read its
statistics, stop it, and ask its version (the health probe).

URLs an engine hands back are not trusted: they are fetched only when they
point at that engine's configured host and port, without userinfo.  Nor is
a redirect followed: whatever answers on an engine's port could send the
proxy anywhere its network reaches.  What an engine says in words (its
errors, its session ids) is shown tamed by L{engine_text}.
"""

import json
import unicodedata
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from ..errors import EngineError, EngineTimeout
from ..metrics import ENGINE_CALLS, Metrics
from .registry import Engine

#: Seconds a stop command may take: it is sent while streams end and the
#: daemon shuts down, which must not wait for a hung engine.
STOP_TIMEOUT = 3.0

#: Largest API answer read into memory; an engine's JSON is a few hundred bytes.
MAX_ANSWER = 64 * 1024

#: Longest engine text (an error, a session id) put in a log line or a
#: player's error, escapes included.
TEXT_LIMIT = 200

#: Unicode categories escaped in an engine's text: controls, format
#: characters (bidirectional overrides among them), surrogates, private use,
#: unassigned code points, and line and paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@attrs.frozen
class Playback:
    """
    A playback session the engine opened for one stream.
    """

    playback_url: str
    stat_url: str
    command_url: str
    playback_session_id: str
    is_live: int


class EngineClient(HTTPClient):
    """
    treq's client, unable to follow a redirect whatever a caller asks: an
    engine's 3xx is an answer the proxy refuses, and its C{Location} (an
    internal service, another host) must never be contacted, even by a
    call that forgot to say so.
    """

    def request(self, method, url, **kwargs):
        kwargs["allow_redirects"] = False
        return super().request(method, url, **kwargs)


def engine_text(value: object, limit: int = TEXT_LIMIT) -> str:
    """
    What an engine said (an error, a session id), fit for a log line and a
    player's JSON error.  Anything answering on an engine's port chooses
    these characters: they must not forge a second log line, drive the
    terminal that shows the log, or flood it.  One line, then, with line
    breaks, backslashes and other control characters escaped as Python
    escapes them, and at most C{limit} characters before a closing C{...};
    an escape is never cut in two.
    """
    pieces: list[str] = []
    size = 0
    for char in str(value):
        piece = _escape(char)
        size += len(piece)
        if size > limit:
            pieces.append("...")
            break
        pieces.append(piece)
    return "".join(pieces)


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def check_url(engine: Engine, url: object, what: str) -> str:
    """
    Accept C{url} only if it is an http(s) URL on C{engine}'s host and port.
    Userinfo (C{http://name@host/}) is refused alike: it would be sent as
    credentials, and it hides the real host from whoever reads the URL.
    """
    if not isinstance(url, str) or not url:
        raise EngineError(f"engine {engine.id} gave no {what}")
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = None
    if (
        parts.scheme not in ("http", "https")
        or "@" in parts.netloc
        or (parts.hostname, port) != (engine.host, engine.port)
    ):
        raise EngineError(
            f"engine {engine.id} gave a {what} outside its own host and port"
            f" (got {_where(parts, port)}, expected {engine.host}:{engine.port})"
        )
    return url


def _where(parts, port: int | None) -> str:
    """
    The scheme, host and port of a refused URL, for its error: what an
    operator needs to see which address the engine believes it has (a
    container's internal name, say).  Userinfo, which may be a password,
    is left out, and the engine's text is tamed.
    """
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    where = f"{host or '(no host)'}:{port}" if port is not None else host or "(no host)"
    if parts.scheme not in ("http", "https"):
        where = f"{parts.scheme or '(no scheme)'}://{where}"
    if "@" in parts.netloc:
        where += " with userinfo"
    return engine_text(where, 80)


def _status_error(engine: Engine, what: str, code: int) -> EngineError:
    """
    The error for an answer other than 200.  A redirect is named as one,
    its C{Location} left out: that address is the engine's choice, perhaps
    an internal one, and no business of a player's.
    """
    if 300 <= code < 400:
        return EngineError(
            f"engine {engine.id} answered {what} with a redirect (HTTP {code}), not followed"
        )
    return EngineError(f"engine {engine.id} answered {what} with HTTP {code}")


def _timed_out(result, timeout: float):
    """
    The C{onTimeoutCancel} of our C{addTimeout}s.  A cancelled treq request
    fails with C{ResponseNeverReceived}, not L{CancelledError}, and Twisted's
    default would pass that on as if the engine had dropped the connection:
    whatever the failure, it was our timeout.
    """
    if isinstance(result, Failure):
        raise TimeoutError(timeout, "Deferred")
    return result


def _with_query(url: str, **params: str) -> str:
    sep = "&" if urlsplit(url).query else "?"
    return url + sep + urlencode(params)


@attrs.define
class EngineAPI:
    """
    @ivar http: a treq C{HTTPClient}; the daemon's is an L{EngineClient}.
    @ivar clock: schedules the timeouts.
    @ivar timeout: seconds an API call may take.
    @ivar first_byte_timeout: seconds until a playback body's headers.
    @ivar metrics: the worker's metrics, where each API call's time counts.
    """

    log = Logger()

    http: object
    clock: object
    timeout: float
    first_byte_timeout: float
    metrics: Metrics = attrs.field(factory=Metrics)

    async def _call(self, engine: Engine, url: str, what: str, timeout: float | None = None) -> dict:
        """
        GET an API URL and decode its JSON, mapping every way it can go wrong
        to L{EngineError} or L{EngineTimeout}.  C{timeout} bounds the whole
        exchange, headers and body together; its time, answered or not, goes
        to the worker's engine request histogram.
        """
        asked_at = self.clock.seconds()
        try:
            d = Deferred.fromCoroutine(self._get(url))
            response, body = await d.addTimeout(timeout or self.timeout, self.clock, _timed_out)
        except (TimeoutError, CancelledError):
            raise EngineTimeout(f"engine {engine.id} did not answer {what} in time")
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"engine {engine.id} failed {what}: {e.__class__.__name__}")
        finally:
            self.metrics.engine_request_seconds.labels(call=ENGINE_CALLS.get(what, what)).observe(
                self.clock.seconds() - asked_at
            )
        if response.code != 200:
            raise _status_error(engine, what, response.code)
        try:
            answer = json.loads(body)
        except ValueError:
            raise EngineError(f"engine {engine.id} answered {what} with something not JSON")
        if not isinstance(answer, dict):
            raise EngineError(f"engine {engine.id} answered {what} with unexpected JSON")
        return answer

    def _fetch(self, url: str, **kwargs) -> Deferred:
        """
        GET C{url} from an engine: every call goes through here, so that
        none follows a redirect, whatever client C{http} is.
        """
        return self.http.get(url, allow_redirects=False, **kwargs)

    async def _get(self, url: str) -> tuple[IResponse, bytes]:
        response = await self._fetch(url)
        return response, await self._read(response)

    def _read(self, response: IResponse):
        """
        Collect a body of at most L{MAX_ANSWER} bytes: an engine answering
        with something endless must not grow our memory.
        """
        return read_bounded(response, MAX_ANSWER, lambda: EngineError("engine answer too large"))

    async def getstream(self, engine: Engine, key: str, param: str = "infohash") -> Playback:
        """
        Ask the engine for a playback session of C{key}, naming it with the
        same parameter (C{infohash} or C{id}) the player used.
        """
        url = f"{engine.url}/ace/getstream?" + urlencode({"format": "json", param: key})
        answer = await self._call(engine, url, "getstream")
        if answer.get("error"):
            raise EngineError(
                f"engine {engine.id} refused the stream: {engine_text(answer['error'])}"
            )
        response = answer.get("response")
        if not isinstance(response, dict):
            raise EngineError(f"engine {engine.id} answered getstream without a response")
        try:
            return Playback(
                playback_url=check_url(engine, response.get("playback_url"), "playback_url"),
                stat_url=check_url(engine, response.get("stat_url"), "stat_url"),
                command_url=check_url(engine, response.get("command_url"), "command_url"),
                playback_session_id=engine_text(response.get("playback_session_id") or ""),
                is_live=int(response.get("is_live") or 0),
            )
        except EngineError:
            await self._abandon(engine, response)
            raise
        except (TypeError, ValueError):
            await self._abandon(engine, response)
            raise EngineError(f"engine {engine.id} answered getstream with unexpected JSON")

    async def _abandon(self, engine: Engine, response: dict) -> None:
        """
        Stop the session an unusable C{getstream} answer opened, or it would
        hold the engine's resources with nobody to end it.  Its command URL
        is not trusted: only its path and query are kept, sent to the
        engine's configured host and port.
        """
        command_url = response.get("command_url")
        if not isinstance(command_url, str):
            return
        try:
            parts = urlsplit(command_url)
        except ValueError:
            return
        if not parts.path.startswith("/"):
            return
        url = engine.url + parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            await self._call(engine, _with_query(url, method="stop"), "stop")
        except EngineError as e:
            self.log.warn(
                "engine {engine}: could not stop a session it answered unusably: {why}",
                engine=engine.id,
                why=e.message,
            )

    async def open_playback(self, engine: Engine, playback: Playback) -> IResponse:
        """
        Start the playback body; fire with the response once its headers are
        in, the body itself left to be streamed.
        """
        check_url(engine, playback.playback_url, "playback_url")
        try:
            d = self._fetch(playback.playback_url, unbuffered=True)
            response = await d.addTimeout(self.first_byte_timeout, self.clock, _timed_out)
        except (TimeoutError, CancelledError):
            raise EngineTimeout(f"engine {engine.id} did not start playback in time")
        except Exception as e:
            raise EngineError(f"engine {engine.id} failed playback: {e.__class__.__name__}")
        if response.code != 200:
            discard_body(response)
            raise _status_error(engine, "playback", response.code)
        return response

    async def stat(self, engine: Engine, playback: Playback) -> dict:
        answer = await self._call(engine, check_url(engine, playback.stat_url, "stat_url"), "stat")
        response = answer.get("response")
        return response if isinstance(response, dict) else {}

    async def stop(self, engine: Engine, playback: Playback) -> None:
        """
        End the engine's playback session (C{command_url?method=stop}).
        """
        url = _with_query(check_url(engine, playback.command_url, "command_url"), method="stop")
        answer = await self._call(engine, url, "stop", min(self.timeout, STOP_TIMEOUT))
        if answer.get("error"):
            raise EngineError(f"engine {engine.id} refused stop: {engine_text(answer['error'])}")

    async def version(self, engine: Engine) -> str:
        """
        The health probe: fire with the engine's version string.
        """
        url = f"{engine.url}/webui/api/service?method=get_version&format=json"
        answer = await self._call(engine, url, "get_version")
        result = answer.get("result")
        if answer.get("error") or not isinstance(result, dict):
            raise EngineError(f"engine {engine.id} answered get_version with an error")
        return str(result.get("version", ""))


def read_bounded(response: IResponse, limit: int, too_large: Callable[[], Exception]):
    """
    Collect C{response}'s body, failing with C{too_large()} as soon as it
    passes C{limit} bytes, whatever its headers said.
    """
    parts: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise too_large()
        parts.append(data)

    return treq.collect(response, collect).addCallback(lambda _: b"".join(parts))


def discard_body(response) -> None:
    """
    Drop an unwanted body without reading it, so its connection is closed.
    """
    try:
        response.deliverBody(_Discard())
    except Exception:
        pass


class _Discard:
    """
    A body protocol that drops what it is given, so an unwanted body does not
    hold its connection.
    """

    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass
