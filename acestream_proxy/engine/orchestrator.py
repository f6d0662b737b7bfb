"""
Engines announced by an orchestrator: C{engines_url} answers a JSON list
in the shape of acestream-orchestrator's C{GET /engines} (each item with
C{container_id}, C{host}, C{port}, C{forwarded}; a C{{"items": [...]}}
wrapper is accepted too), polled every C{engines_refresh} seconds.

An engine that appears joins the registry unhealthy and is used once its
health probe passes, so that a container still starting gets no stream.
An engine that disappears is removed from the registry (no new stream) and
the streams playing on it fail over, as a reconnection does.

The orchestrator is trusted with the addresses of engines, not with the
daemon's health: no redirect is followed, the answer is bounded in time
and size, and whatever is wrong with it (no answer, bad JSON, wrong shape,
too large) is logged once per change while the last good list stays.

Optionally (C{engines_events}), the streams this worker owns are reported
to the orchestrator's C{POST /events/stream_started} and
C{/events/stream_ended}, next to C{engines_url}: fire-and-forget, each
with a timeout, so that an orchestrator that does not answer never holds a
stream up.  They are found by looking at the streams every second rather
than by a hook in the stream's code: a report may come a second late,
which an orchestrator counting its engines' use can afford.
"""

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from urllib.parse import urljoin

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..background import Tasks, periodic
from ..constants import Role, StreamState
from .api import discard_body, read_bounded
from .registry import Engine, EngineRegistry

#: Largest answer read: a thousand engines of acestream-orchestrator's
#: fields take about half of it.
MAX_ANSWER = 1024 * 1024

#: Most engines taken from one answer; a longer list is refused whole,
#: since it is more likely a mistake than a fleet.
MAX_ENGINES = 1000

#: Seconds between two looks at the streams, for events.
EVENTS_INTERVAL = 1.0

#: Seconds an event's POST may take; it is dropped after.
EVENT_TIMEOUT = 5.0

#: A container id: Docker's are 64 hex digits; names and host:port ids fit.
_ENGINE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")

#: A DNS name or an IPv4 address.
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")


class OrchestratorError(Exception):
    """
    The orchestrator's answer is unusable; the message is ours, never the
    orchestrator's text.
    """


@attrs.frozen
class Announced:
    """
    One engine as the orchestrator describes it.
    """

    id: str
    host: str
    port: int
    forwarded: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_engines(body: bytes) -> tuple[list[Announced], list[str]]:
    """
    The engines in an answer, and what was wrong with the items left out
    (by position: an item's own text is not repeated in our logs).  An
    answer that is no list of engines at all raises L{OrchestratorError}.
    """
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise OrchestratorError("its answer is not JSON")
    if isinstance(answer, dict) and isinstance(answer.get("items"), list):
        answer = answer["items"]
    if not isinstance(answer, list):
        raise OrchestratorError("its answer is not a list of engines")
    if len(answer) > MAX_ENGINES:
        raise OrchestratorError(f"it lists more than {MAX_ENGINES} engines")
    engines: list[Announced] = []
    problems: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(answer):
        try:
            engine = _announced(item)
        except OrchestratorError as e:
            problems.append(f"item {i}: {e}")
            continue
        if engine.id in seen:
            problems.append(f"item {i}: a container_id listed before")
            continue
        seen.add(engine.id)
        engines.append(engine)
    return engines, problems


def _announced(item: object) -> Announced:
    if not isinstance(item, dict):
        raise OrchestratorError("not an object")
    engine_id = item.get("container_id")
    if not isinstance(engine_id, str) or not _ENGINE_ID.fullmatch(engine_id):
        raise OrchestratorError("no usable container_id")
    host = item.get("host")
    if not isinstance(host, str) or not _usable_host(host):
        raise OrchestratorError("no usable host")
    port = item.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise OrchestratorError("no usable port")
    forwarded = item.get("forwarded", False)
    if not isinstance(forwarded, bool):
        raise OrchestratorError("forwarded is not true or false")
    return Announced(engine_id, host.lower(), port, forwarded)


def _usable_host(host: str) -> bool:
    """
    A host name or an IP address, nothing that could carry a port, a path
    or credentials into the engine's URL.
    """
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return _HOST_NAME.fullmatch(host) is not None


def _timed_out(result, timeout: float):
    """
    Whatever a request cancelled by our timeout fails with, it timed out.
    """
    if isinstance(result, Failure):
        raise TimeoutError(timeout, "Deferred")
    return result


@attrs.define(eq=False)
class Orchestrator(MultiService):
    """
    Polls C{url} and keeps the registry's announced engines in step with
    it.  Engines the configuration names are never touched; an announced
    engine whose id is one of theirs is left out.

    @ivar http: a treq C{HTTPClient} (the daemon's follows no redirect;
        every call here says so too).
    @ivar streams: the worker's streams now, to fail over those on an
        engine that disappeared.
    @ivar timeout: seconds the whole exchange, answer included, may take.
    """

    log = Logger()

    url: str
    http: object
    clock: object
    registry: EngineRegistry
    streams: Callable[[], Iterable]
    refresh_interval: float
    timeout: float
    api_key: str | None = attrs.field(default=None, repr=False)
    announced: dict = attrs.field(factory=dict, init=False)
    tasks: Tasks = attrs.field(init=False)
    _problem: str | None = attrs.field(default=None, init=False)
    _skipped: tuple = attrs.field(default=(), init=False)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.tasks = Tasks(self.log, self.clock, "the orchestrator poll")
        periodic(self.refresh_interval, self.refresh, self.clock, self.tasks).setServiceParent(
            self
        )

    def stopService(self):
        """
        Cancel the request under way and the probes of new engines: none
        may outlive the daemon's stop.
        """
        self.tasks.cancel_all()
        return MultiService.stopService(self)

    async def refresh(self) -> None:
        """
        Ask once, and apply the answer; on any failure keep what we have.
        """
        try:
            engines, skipped = parse_engines(await self._fetch())
        except CancelledError:
            raise
        except OrchestratorError as e:
            self._report(str(e))
            return
        self._report(None)
        self._report_skipped(skipped)
        self._apply(engines)

    async def _fetch(self) -> bytes:
        headers = {b"Accept": [b"application/json"]}
        if self.api_key is not None:
            headers[b"Authorization"] = [b"Bearer " + self.api_key.encode("ascii")]
        try:
            d = Deferred.fromCoroutine(self._get(headers))
            return await d.addTimeout(self.timeout, self.clock, _timed_out)
        except TimeoutError:
            raise OrchestratorError(f"it did not answer within {self.timeout:g}s")
        except (OrchestratorError, CancelledError):
            raise
        except Exception as e:
            raise OrchestratorError(f"asking it failed: {e.__class__.__name__}")

    async def _get(self, headers: dict) -> bytes:
        response = await self.http.get(self.url, headers=headers, allow_redirects=False)
        if response.code != 200:
            discard_body(response)
            if 300 <= response.code < 400:
                raise OrchestratorError(
                    f"it answered a redirect (HTTP {response.code}), not followed"
                )
            raise OrchestratorError(f"it answered HTTP {response.code}")
        if isinstance(response.length, int) and response.length > MAX_ANSWER:
            discard_body(response)
            raise OrchestratorError(f"its answer is larger than {MAX_ANSWER} bytes")
        return await read_bounded(
            response,
            MAX_ANSWER,
            lambda: OrchestratorError(f"its answer is larger than {MAX_ANSWER} bytes"),
        )

    def _report(self, problem: str | None) -> None:
        """
        Log a problem when it begins or changes, and its end; a problem
        that lasts is not repeated every poll.
        """
        if problem == self._problem:
            return
        if problem is not None:
            self.log.warn(
                "orchestrator: engine list unusable, keeping the {n} engines it last"
                " announced: {why}",
                n=len(self.announced),
                why=problem,
            )
        else:
            self.log.info("orchestrator: engine list usable again")
        self._problem = problem

    def _report_skipped(self, skipped: list[str]) -> None:
        if tuple(skipped) == self._skipped:
            return
        self._skipped = tuple(skipped)
        if skipped:
            self.log.warn(
                "orchestrator: {n} engines of its list left out: {why}",
                n=len(skipped),
                why="; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""),
            )

    def _apply(self, engines: list[Announced]) -> None:
        wanted: dict[str, Announced] = {}
        for engine in engines:
            if engine.id not in self.announced and self.registry.by_id(engine.id) is not None:
                # A configured engine's id: the configuration wins.
                continue
            wanted[engine.id] = engine
        for engine_id, (announced, engine) in list(self.announced.items()):
            now = wanted.get(engine_id)
            if now is None or (now.host, now.port) != (announced.host, announced.port):
                self._withdraw(engine_id, engine)
            elif now.forwarded != engine.forwarded:
                engine.forwarded = now.forwarded
                self.announced[engine_id] = (now, engine)
        for engine_id, now in wanted.items():
            if engine_id not in self.announced:
                self._add(now)

    def _add(self, announced: Announced) -> None:
        engine = Engine(
            announced.id,
            announced.url,
            announced.host,
            announced.port,
            announced.forwarded,
            # Used once its probe passes.
            healthy=False,
        )
        self.announced[announced.id] = (announced, engine)
        self.registry.add(engine)
        self.log.info(
            "orchestrator: engine {engine} appeared at {url}", engine=engine.id, url=engine.url
        )
        self.tasks.run(lambda: self.registry.probe_one(engine))

    def _withdraw(self, engine_id: str, engine: Engine) -> None:
        del self.announced[engine_id]
        self.registry.remove(engine_id)
        moved = 0
        for stream in list(self.streams()):
            source = getattr(stream, "source", None)
            if stream.engine is engine and hasattr(source, "fail_over"):
                moved += source.fail_over(f"engine {engine_id} was withdrawn by the orchestrator")
        self.log.info(
            "orchestrator: engine {engine} withdrawn; {moved} streams fail over",
            engine=engine_id,
            moved=moved,
        )


@attrs.define(eq=False)
class EventReporter(MultiService):
    """
    Tells the orchestrator which engine sessions this worker's streams
    hold: C{stream_started} when one begins to play (after a fail-over,
    the new session too), C{stream_ended} when it is gone.  The stream's
    id for the orchestrator is C{key|playback_session_id}, sent in the
    started event's labels.  A report that fails is not retried; failures
    are logged once per change.
    """

    log = Logger()

    engines_url: str
    http: object
    clock: object
    streams: Callable[[], Iterable]
    api_key: str | None = attrs.field(default=None, repr=False)
    interval: float = EVENTS_INTERVAL
    timeout: float = EVENT_TIMEOUT
    reported: dict = attrs.field(factory=dict, init=False)
    tasks: Tasks = attrs.field(init=False)
    _problem: str | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.tasks = Tasks(self.log, self.clock, "the orchestrator events")
        periodic(self.interval, self.check, self.clock, self.tasks).setServiceParent(self)

    def stopService(self):
        self.tasks.cancel_all()
        return MultiService.stopService(self)

    def event_url(self, name: str) -> str:
        return urljoin(self.engines_url, f"events/{name}")

    def check(self) -> None:
        playing = {}
        for stream in list(self.streams()):
            source = getattr(stream, "source", None)
            playback = getattr(source, "playback", None)
            engine = stream.engine
            if (
                stream.role is Role.OWNER
                and getattr(source, "state", None) in (StreamState.STARTED, StreamState.UNHEALTHY)
                and playback is not None
                and engine is not None
            ):
                playing[f"{stream.key}|{playback.playback_session_id}"] = (
                    stream,
                    engine,
                    playback,
                )
        for stream_id, container_id in list(self.reported.items()):
            if stream_id not in playing:
                del self.reported[stream_id]
                event = {"container_id": container_id, "stream_id": stream_id, "reason": "ended"}
                self.tasks.run(self._post("stream_ended", event))
        for stream_id, (stream, engine, playback) in playing.items():
            if stream_id in self.reported:
                continue
            self.reported[stream_id] = engine.id
            event = {
                "container_id": engine.id,
                "engine": {"host": engine.host, "port": engine.port},
                "stream": {
                    "key_type": "content_id" if stream.param == "id" else "infohash",
                    "key": stream.key,
                },
                "session": {
                    "playback_session_id": playback.playback_session_id,
                    "stat_url": playback.stat_url,
                    "command_url": playback.command_url,
                    "is_live": playback.is_live,
                },
                "labels": {"stream_id": stream_id},
            }
            self.tasks.run(self._post("stream_started", event))

    async def _post(self, name: str, event: dict) -> None:
        headers = {b"Content-Type": [b"application/json"]}
        if self.api_key is not None:
            headers[b"Authorization"] = [b"Bearer " + self.api_key.encode("ascii")]
        try:
            d = Deferred.fromCoroutine(self._send(name, event, headers))
            await d.addTimeout(self.timeout, self.clock, _timed_out)
        except CancelledError:
            raise
        except TimeoutError:
            self._report(f"{name}: no answer within {self.timeout:g}s")
        except OrchestratorError as e:
            self._report(f"{name}: {e}")
        except Exception as e:
            self._report(f"{name}: {e.__class__.__name__}")
        else:
            self._report(None)

    async def _send(self, name: str, event: dict, headers: dict) -> None:
        response = await self.http.post(
            self.event_url(name),
            data=json.dumps(event).encode(),
            headers=headers,
            allow_redirects=False,
        )
        # What it answers is of no use here: dropped unread.
        discard_body(response)
        if not 200 <= response.code < 300:
            raise OrchestratorError(f"it answered HTTP {response.code}")

    def _report(self, problem: str | None) -> None:
        if problem == self._problem:
            return
        if problem is not None:
            self.log.warn("orchestrator: an event report failed: {why}", why=problem)
        else:
            self.log.info("orchestrator: event reports accepted again")
        self._problem = problem
