"""
Talking to an AceStream engine over its HTTP API with treq: start a playback
session (C{getstream}, JSON format), open its playback body, read its
statistics, stop it, and ask its version (the health probe).

URLs an engine hands back are not trusted: they are fetched only when they
point at that engine's configured host and port.
"""

import json
from urllib.parse import urlencode, urlsplit

import attrs
import treq
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from ..errors import EngineError, EngineTimeout
from .registry import Engine

#: Seconds a stop command may take: it is sent while streams end and the
#: daemon shuts down, which must not wait for a hung engine.
STOP_TIMEOUT = 3.0

#: Largest API answer read into memory; an engine's JSON is a few hundred bytes.
MAX_ANSWER = 64 * 1024


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


def check_url(engine: Engine, url: object, what: str) -> str:
    """
    Accept C{url} only if it is an http(s) URL on C{engine}'s host and port.
    """
    if not isinstance(url, str) or not url:
        raise EngineError(f"engine {engine.id} gave no {what}")
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or (parts.hostname, port) != (
        engine.host,
        engine.port,
    ):
        raise EngineError(f"engine {engine.id} gave a {what} outside its own host and port")
    return url


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
    @ivar http: a treq C{HTTPClient}.
    @ivar clock: schedules the timeouts.
    @ivar timeout: seconds an API call may take.
    @ivar first_byte_timeout: seconds until a playback body's headers.
    """

    log = Logger()

    http: object
    clock: object
    timeout: float
    first_byte_timeout: float

    async def _call(self, engine: Engine, url: str, what: str, timeout: float | None = None) -> dict:
        """
        GET an API URL and decode its JSON, mapping every way it can go wrong
        to L{EngineError} or L{EngineTimeout}.  C{timeout} bounds the whole
        exchange, headers and body together.
        """
        try:
            d = Deferred.fromCoroutine(self._get(url))
            response, body = await d.addTimeout(timeout or self.timeout, self.clock, _timed_out)
        except (TimeoutError, CancelledError):
            raise EngineTimeout(f"engine {engine.id} did not answer {what} in time")
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"engine {engine.id} failed {what}: {e.__class__.__name__}")
        if response.code != 200:
            raise EngineError(f"engine {engine.id} answered {what} with HTTP {response.code}")
        try:
            answer = json.loads(body)
        except ValueError:
            raise EngineError(f"engine {engine.id} answered {what} with something not JSON")
        if not isinstance(answer, dict):
            raise EngineError(f"engine {engine.id} answered {what} with unexpected JSON")
        return answer

    async def _get(self, url: str) -> tuple[IResponse, bytes]:
        response = await self.http.get(url)
        return response, await self._read(response)

    def _read(self, response: IResponse):
        """
        Collect a body of at most L{MAX_ANSWER} bytes: an engine answering
        with something endless must not grow our memory.
        """
        parts: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_ANSWER:
                raise EngineError("engine answer too large")
            parts.append(data)

        return treq.collect(response, collect).addCallback(lambda _: b"".join(parts))

    async def getstream(self, engine: Engine, key: str, param: str = "infohash") -> Playback:
        """
        Ask the engine for a playback session of C{key}, naming it with the
        same parameter (C{infohash} or C{id}) the player used.
        """
        url = f"{engine.url}/ace/getstream?" + urlencode({"format": "json", param: key})
        answer = await self._call(engine, url, "getstream")
        if answer.get("error"):
            raise EngineError(f"engine {engine.id} refused the stream: {answer['error']}")
        response = answer.get("response")
        if not isinstance(response, dict):
            raise EngineError(f"engine {engine.id} answered getstream without a response")
        try:
            return Playback(
                playback_url=check_url(engine, response.get("playback_url"), "playback_url"),
                stat_url=check_url(engine, response.get("stat_url"), "stat_url"),
                command_url=check_url(engine, response.get("command_url"), "command_url"),
                playback_session_id=str(response.get("playback_session_id") or ""),
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
            d = self.http.get(playback.playback_url, unbuffered=True)
            response = await d.addTimeout(self.first_byte_timeout, self.clock, _timed_out)
        except (TimeoutError, CancelledError):
            raise EngineTimeout(f"engine {engine.id} did not start playback in time")
        except Exception as e:
            raise EngineError(f"engine {engine.id} failed playback: {e.__class__.__name__}")
        if response.code != 200:
            response.deliverBody(_Discard())
            raise EngineError(f"engine {engine.id} answered playback with HTTP {response.code}")
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
            raise EngineError(f"engine {engine.id} refused stop: {answer['error']}")

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
