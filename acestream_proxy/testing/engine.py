"""
A simulated AceStream engine.

It speaks the parts of the engine's HTTP API the proxy uses (version probe,
C{/ace/getstream?format=json}, playback, stat and command URLs) and serves an
endless live MPEG-TS stream per playback session, so the proxy can be demoed,
tested and benchmarked without a real engine, a peer-to-peer network or a
broadcast.

The stream is synthetic but checkable: every data packet carries a sequence
number taken from a clock shared by all sessions of the engine, a tag derived
from the content id and the time it was sent (see
L{acestream_proxy.testing.synthetic}).  Two viewers of one broadcast therefore see the
same numbers for the same moment, as they would from a real engine, and
L{acestream_proxy.testing.synthetic.verify} can tell a lost, repeated or misrouted packet
from a faithful relay.

Faults that real engines exhibit can be switched on and off from Python
(L{SimulatedEngine.faults}) or over HTTP (C{POST}/C{DELETE /sim/faults/NAME}),
which is how the proxy's error handling is tested against a running engine.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Callable
from urllib.parse import urlencode

import attrs
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter
from zope.interface import implementer

from . import synthetic
from .source import TsSource

#: Every fault the engine can simulate.
FAULTS = frozenset(
    {
        "getstream_error",
        "getstream_500",
        "getstream_garbage",
        "getstream_wrong_shape",
        "getstream_hang",
        "foreign_playback",
        "playback_stall",
        "playback_desync",
        "playback_not_ts",
        "playback_500",
        "version_fail",
    }
)

#: What C{get_version} reports (that of a current Linux engine).
VERSION = {"code": 3010500, "platform": "linux", "version": "3.1.5"}

#: Host the C{foreign_playback} fault points the session URLs at: an address
#: of this machine the engine does not listen on, as when the engine reports
#: its own view of its address from inside a container.
FOREIGN_HOST = "127.0.0.2"

#: A live engine never sends more than this much backlog in one batch (say
#: after the reactor was blocked); older packets are skipped.
MAX_BACKLOG_SECONDS = 5.0

#: Bytes put before every batch by C{playback_desync}; no 0x47 among them.
DESYNC_JUNK = b"\x00junk"

#: The body C{playback_not_ts} streams instead of MPEG-TS; no 0x47 in it.
NOT_TS_TEXT = b"this is not a transport stream, just some text\n"

_HASH = re.compile(r"[0-9a-fA-F]{40}\Z")
_HASH_PARAMS = ("infohash", "id")


def content_tag(infohash: str) -> bytes:
    """
    The 4-byte tag the engine puts in every data packet of a content id, so
    a verifier can tell broadcasts apart.
    """
    return bytes.fromhex(infohash)[:4]


def getstream_path(infohash: str, param: str = "infohash") -> str:
    """The path and query a client asks C{getstream} with."""
    return "/ace/getstream?" + urlencode({"format": "json", param: infohash})


def _new_session_id() -> str:
    return secrets.token_hex(16)


@attrs.define(eq=False)
class EngineSession:
    """
    One playback session handed out by C{getstream}.

    @ivar session_id: The random hex id in its URLs.
    @ivar hash: The content id or infohash it plays.
    @ivar param: Which query parameter named it (C{"infohash"} or C{"id"}).
    @ivar started_at: Engine clock time when it was created.
    @ivar bytes_sent: Body bytes written to all its playback connections.
    """

    session_id: str
    hash: str
    param: str
    started_at: float
    bytes_sent: int = 0
    _playbacks: set[_Playback] = attrs.field(factory=set, init=False, repr=False)

    @property
    def playback_connections(self) -> int:
        """How many playback connections of this session are open."""
        return len(self._playbacks)

    def as_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "param": self.param,
            "started_at": self.started_at,
            "bytes_sent": self.bytes_sent,
            "playback_connections": self.playback_connections,
        }


@implementer(IPushProducer)
@attrs.define(eq=False)
class _Playback:
    """
    One open playback connection: a timer that writes a batch of packets
    every C{batch_interval}, from the engine's shared sequence clock.

    It is the request's push producer: while the client's connection is
    backed up the due packets wait, as they would in a real engine's socket
    and send buffers, and go out together on resume; past
    L{MAX_BACKLOG_SECONDS} of them the oldest are skipped, as a live engine
    would rather skip than buffer without end.
    """

    engine: SimulatedEngine
    session: EngineSession
    request: IRequest
    text: bool
    next_seq: int
    _tag: bytes = attrs.field(init=False)
    _cc: int = attrs.field(default=0, init=False)
    _paused: bool = attrs.field(default=False, init=False)
    _loop: LoopingCall | None = attrs.field(default=None, init=False)
    #: Fires when the response is to end cleanly; Klein then finishes it.
    ended: Deferred[None] = attrs.field(factory=Deferred, init=False)

    def __attrs_post_init__(self) -> None:
        self._tag = content_tag(self.session.hash)

    def start(self) -> None:
        """
        Start streaming.  The response head and (unless a fault says
        otherwise) the first batch go out at once, so that a stalling engine
        looks to its client like an accepted stream that carries nothing.
        """
        self.engine._playbacks.add(self)
        self.session._playbacks.add(self)
        self.request.write(b"")
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(self._finished)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.engine.reactor
        self._loop.start(self.engine.batch_interval, now=True)

    def _tick(self) -> None:
        """Write the packets that fell due since the previous batch."""
        if self._paused:
            return
        end = self.engine.current_seq(self.session.hash) + 1
        first = max(self.next_seq, end - self.engine.max_backlog_packets)
        self.next_seq = end
        faults = self.engine.faults
        if "playback_stall" in faults:
            return
        source = self.engine.source
        if self.text:
            payload = _text_body((end - first + 2) * synthetic.PACKET_SIZE)
        elif source is not None:
            payload = source.packets(first, end, self._tag, self.engine.reactor.seconds())
        else:
            payload = b"".join(
                (
                    synthetic.pat_packet(self._cc),
                    synthetic.pmt_packet(self._cc),
                    synthetic.data_packets(
                        first, end - first, self._tag, self.engine.reactor.seconds()
                    ),
                )
            )
        self._cc = (self._cc + 1) & 0xF
        if "playback_desync" in faults:
            payload = DESYNC_JUNK + payload
        self.session.bytes_sent += len(payload)
        self.request.write(payload)

    def finish(self) -> None:
        """End the response cleanly, as when the session is stopped."""
        self._halt()
        self.request.unregisterProducer()
        self.ended.callback(None)

    def abort(self) -> None:
        """Cut the connection without ending the response."""
        self._halt()
        self.request.channel.transport.abortConnection()

    def _halt(self) -> None:
        """Stop the timer and stop counting as an open connection."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self in self.engine._playbacks:
            self.engine._playbacks.discard(self)
            self.session._playbacks.discard(self)
            self.engine.log.info(
                "Playback of session {session_id} ended",
                session_id=self.session.session_id,
            )

    def _finished(self, result: object) -> None:
        """The response ended or the client went away: no more timer."""
        self._halt()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False

    def stopProducing(self) -> None:
        self._halt()


def _text_body(size: int) -> bytes:
    """C{size} bytes of the not-a-transport-stream text."""
    repeats = size // len(NOT_TS_TEXT) + 1
    return (NOT_TS_TEXT * repeats)[:size]


class _Segment(BaseConverter):
    """
    One path segment, which may be empty (C{/ace/stat//ID} names a session
    of an empty content id, unknown like any other).
    """

    regex = "[^/]*"
    part_isolating = True


#: The tail of a playback, stat or command path: content id, session id.
_SESSION = "<segment:infohash>/<segment:session_id>"


@attrs.define(eq=False)
class SimulatedEngine:
    """
    An in-process stand-in for an AceStream engine's HTTP API.

    Serve L{resource} with a L{twisted.web.server.Site}.  Everything it does
    is driven by C{reactor} (its C{seconds} and C{callLater}), so tests can
    drive it with a L{twisted.internet.task.Clock}.

    @ivar bitrate: Bits per second of each playback stream.
    @ivar source: A file to play instead of the synthetic stream, or
        L{None}; it is played at C{bitrate}, from its first packet at the
        first playback of each content, and looped.
    @ivar batch_interval: Seconds between two writes to a playback connection.
    @ivar faults: Names (from L{FAULTS}) of the faults currently simulated;
        a plain set, change it freely.
    @ivar epoch: Engine clock time at which sequence number 0 was due; fixed
        at construction so that every session and every reconnect of a
        content shows the same sequence number at the same moment.
    @ivar getstream_calls: C{(param_name, hash)} for every C{getstream} call
        that named a content, including failed ones, oldest first.
    @ivar sessions: Live sessions by session id (L{EngineSession}).
    @ivar stopped: Session ids that received C{method=stop}, in order.
    @cvar app: The routes of the HTTP API (Klein), one handler each.
    """

    reactor: IReactorTime
    bitrate: int = 4_000_000
    batch_interval: float = 0.05
    source: TsSource | None = None
    log: Logger = attrs.field(factory=lambda: Logger(namespace=__name__))
    faults: set[str] = attrs.field(factory=set, converter=set)
    epoch: float = attrs.field(init=False)
    getstream_calls: list[tuple[str, str]] = attrs.field(factory=list, init=False)
    sessions: dict[str, EngineSession] = attrs.field(factory=dict, init=False)
    stopped: list[str] = attrs.field(factory=list, init=False)
    _playbacks: set[_Playback] = attrs.field(factory=set, init=False, repr=False)
    _source_epochs: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)

    app = Klein()
    app.url_map.converters["segment"] = _Segment
    # A path with doubled slashes is not one of ours: werkzeug would answer
    # it with a redirect to the merged path.
    app.url_map.merge_slashes = False

    def __attrs_post_init__(self) -> None:
        self.epoch = self.reactor.seconds()

    @property
    def packets_per_second(self) -> float:
        return self.bitrate / (synthetic.PACKET_SIZE * 8)

    @property
    def max_backlog_packets(self) -> int:
        return max(1, int(self.packets_per_second * MAX_BACKLOG_SECONDS))

    @property
    def playback_connections(self) -> int:
        """How many playback connections are open, over all sessions."""
        return len(self._playbacks)

    def current_seq(self, infohash: str | None = None) -> int:
        """
        The sequence number due now, the same for every content; with a
        L{source}, the index of the file's packet (counted over its loops)
        due now for C{infohash}.

        A source's broadcast of a content begins at its first playback and
        runs on from there for every later session of that content, so
        that the first viewer sees the file from its start (its PAT, PMT
        and first keyframe) and two viewers of one content the same bytes
        at the same moment.
        """
        epoch = self.epoch
        if self.source is not None and infohash is not None:
            epoch = self._source_epochs.setdefault(infohash, self.reactor.seconds())
        return int((self.reactor.seconds() - epoch) * self.packets_per_second)

    def resource(self) -> IResource:
        """The engine's whole HTTP API: the routes of L{app}."""
        return _EngineRoutes(self.app)

    def open_session(self, infohash: str, param: str = "infohash") -> EngineSession:
        """Create a playback session, as a successful C{getstream} does."""
        session = EngineSession(
            session_id=_new_session_id(),
            hash=infohash,
            param=param,
            started_at=self.reactor.seconds(),
        )
        self.sessions[session.session_id] = session
        self.log.info(
            "Session {session_id} opened for {hash} (by {param})",
            session_id=session.session_id,
            hash=infohash,
            param=param,
        )
        return session

    def stop_session(self, session_id: str) -> bool:
        """
        End a session's playback connections cleanly and forget it.

        @return: Whether there was such a session.
        """
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        for playback in list(session._playbacks):
            playback.finish()
        self.log.info("Session {session_id} stopped", session_id=session_id)
        return True

    def drop_playback(self) -> int:
        """
        Abruptly close every open playback connection now, as a crashing or
        restarting engine would.

        @return: How many connections were closed.
        """
        playbacks = list(self._playbacks)
        for playback in playbacks:
            playback.abort()
        self.log.info("Dropped {count} playback connections", count=len(playbacks))
        return len(playbacks)

    def state(self) -> dict[str, Any]:
        """The inspection data, as served by C{GET /sim/state}."""
        return {
            "getstream_calls": [list(call) for call in self.getstream_calls],
            "sessions": {
                session_id: session.as_json()
                for session_id, session in self.sessions.items()
            },
            "stopped": list(self.stopped),
            "playback_connections": self.playback_connections,
            "faults": sorted(self.faults),
        }

    # HTTP handlers, one per route.  Each returns the body, or a Deferred
    # that fires when the response is complete (Klein then ends it).

    @app.route("/webui/api/service", methods=["GET"])
    def _get_version(self, request: IRequest) -> bytes:
        if "version_fail" in self.faults:
            return _plain(request, 500, b"version check failed")
        if _arg(request, "method") != "get_version":
            return _json(request, {"result": None, "error": "unknown method"})
        return _json(request, {"result": VERSION, "error": None})

    @app.route("/ace/getstream", methods=["GET"])
    def _getstream(self, request: IRequest) -> bytes | Deferred[None]:
        param, infohash = _content_param(request)
        if param is not None:
            self.getstream_calls.append((param, infohash))
        failure = self._getstream_fault(request)
        if failure is not None:
            return failure
        if param is None or not _HASH.match(infohash):
            return _json(
                request,
                {"response": None, "error": "missing or invalid infohash or id"},
            )
        session = self.open_session(infohash, param)
        base = self._base_url(request)
        path = f"{infohash}/{session.session_id}"
        return _json(
            request,
            {
                "response": {
                    "playback_url": f"{base}/ace/r/{path}",
                    "stat_url": f"{base}/ace/stat/{path}",
                    "command_url": f"{base}/ace/cmd/{path}",
                    "playback_session_id": session.session_id,
                    "is_live": 1,
                    "infohash": infohash,
                },
                "error": None,
            },
        )

    def _getstream_fault(self, request: IRequest) -> bytes | Deferred[None] | None:
        """The broken answer an active getstream fault calls for, if any."""
        if "getstream_hang" in self.faults:
            self.log.info("getstream left unanswered (getstream_hang)")
            # Never fires; Klein cancels it when the client goes away.
            return Deferred()
        if "getstream_500" in self.faults:
            return _plain(request, 500, b"boom")
        if "getstream_garbage" in self.faults:
            return _answer(
                request, 200, b"text/html", b"<html><body>Service Unavailable</body></html>"
            )
        if "getstream_wrong_shape" in self.faults:
            return _json(request, {"response": {"foo": 1}, "error": None})
        if "getstream_error" in self.faults:
            return _json(
                request, {"response": None, "error": "simulated engine error"}
            )
        return None

    def _base_url(self, request: IRequest) -> str:
        """Where the session URLs point: back at this engine, as addressed."""
        port = request.getHost().port
        if "foreign_playback" in self.faults:
            return f"http://{FOREIGN_HOST}:{port}"
        host = request.getHeader(b"host")
        if host:
            return "http://" + host.decode("latin-1")
        return f"http://{request.getHost().host}:{port}"

    @app.route(f"/ace/r/{_SESSION}", methods=["GET"])
    def _playback(
        self, request: IRequest, infohash: str, session_id: str
    ) -> bytes | Deferred[None]:
        session = self._session(infohash, session_id)
        if session is None:
            return _plain(request, 404, b"unknown playback session")
        if "playback_500" in self.faults:
            return _plain(request, 500, b"playback failed")
        text = "playback_not_ts" in self.faults
        request.setHeader(b"Content-Type", b"text/plain" if text else b"video/mp2t")
        playback = _Playback(
            engine=self,
            session=session,
            request=request,
            text=text,
            next_seq=self.current_seq(infohash),
        )
        self.log.info(
            "Playback of session {session_id} started at seq {seq}",
            session_id=session_id,
            seq=playback.next_seq,
        )
        playback.start()
        return playback.ended

    @app.route(f"/ace/stat/{_SESSION}", methods=["GET"])
    def _stat(self, request: IRequest, infohash: str, session_id: str) -> bytes:
        session = self._session(infohash, session_id)
        if session is None:
            return _json(request, {"response": None, "error": "unknown session"})
        return _json(
            request,
            {
                "response": {
                    "status": "dl",
                    "peers": 12,
                    "speed_down": 500,
                    "speed_up": 20,
                    "downloaded": session.bytes_sent,
                    "uploaded": 0,
                },
                "error": None,
            },
        )

    @app.route(f"/ace/cmd/{_SESSION}", methods=["GET"])
    def _command(self, request: IRequest, infohash: str, session_id: str) -> bytes:
        method = _arg(request, "method")
        if method != "stop":
            return _json(request, {"response": None, "error": "unknown method"})
        self.stopped.append(session_id)
        if self._session(infohash, session_id) is None:
            return _json(request, {"response": None, "error": "unknown session"})
        self.stop_session(session_id)
        return _json(request, {"response": "ok", "error": None})

    def _session(self, infohash: str, session_id: str) -> EngineSession | None:
        session = self.sessions.get(session_id)
        if session is None or session.hash != infohash:
            return None
        return session

    @app.route("/sim/faults/<segment:name>", methods=["POST"])
    def _fault_on(self, request: IRequest, name: str) -> bytes:
        return self._switch_fault(request, name, self.faults.add)

    @app.route("/sim/faults/<segment:name>", methods=["DELETE"])
    def _fault_off(self, request: IRequest, name: str) -> bytes:
        return self._switch_fault(request, name, self.faults.discard)

    def _switch_fault(
        self, request: IRequest, name: str, switch: Callable[[str], None]
    ) -> bytes:
        if name not in FAULTS:
            return _json(request, {"error": f"unknown fault {name!r}"}, code=404)
        switch(name)
        self.log.info(
            "Fault {fault} {action}",
            fault=name,
            action="on" if name in self.faults else "off",
        )
        return _json(request, {"faults": sorted(self.faults)})

    @app.route("/sim/drop", methods=["POST"])
    def _drop(self, request: IRequest) -> bytes:
        return _json(request, {"dropped": self.drop_playback()})

    @app.route("/sim/state", methods=["GET"])
    def _state(self, request: IRequest) -> bytes:
        return _json(request, self.state())

    # Answers for requests no route takes, in the engine's plain text.

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _plain(request, 404, b"not found")

    @app.handle_errors(MethodNotAllowed)
    def _wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        return _plain(request, 405, b"method not allowed")


def _without_implicit_head(app: Klein) -> None:
    """
    Take back the HEAD that werkzeug lets into every GET route.  A HEAD of
    C{getstream} would open a session and one of a playback URL would stream
    into a body nobody reads; the engine answers HEAD with 405, as it always
    has.
    """
    for rule in app.url_map.iter_rules():
        rule.methods.discard("HEAD")


_without_implicit_head(SimulatedEngine.app)


class _EngineRoutes(KleinResource):
    """
    Klein's resource, routing on the path as the engine always has: as sent
    (escapes not undone, any byte taken as latin-1) and with its leading
    and trailing slashes ignored.  Klein would route on the unescaped
    segments instead, and answer a path that is not UTF-8 with a 400.  (A
    Host header that is not UTF-8 still gets that 400: Klein decodes the
    host name before it tries any route.)
    """

    def render(self, request: IRequest) -> int:
        path = request.path.decode("latin-1").strip("/")
        # Klein joins these and decodes them as UTF-8: back to C{path}.
        request.postpath = [segment.encode("utf-8") for segment in path.split("/")]
        return super().render(request)


def _arg(request: IRequest, name: str) -> str | None:
    """The first value of query parameter C{name}, decoded."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def _content_param(request: IRequest) -> tuple[str | None, str]:
    """Which parameter names the content (C{infohash} first), and its value."""
    for param in _HASH_PARAMS:
        value = _arg(request, param)
        if value is not None:
            return param, value
    return None, ""


def _json(request: IRequest, body: object, code: int = 200) -> bytes:
    return _answer(request, code, b"application/json", json.dumps(body).encode("utf-8"))


def _plain(request: IRequest, code: int, body: bytes) -> bytes:
    return _answer(request, code, b"text/plain", body)


def _answer(request: IRequest, code: int, content_type: bytes, body: bytes) -> bytes:
    """
    Set the head of a whole answer.  Its length is given, as Twisted gives
    it for a body a resource returns: Klein writes the body instead, which
    would go out chunked, or end only with the connection.
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body
