"""
The HTTP API (Klein): players' C{/ace/getstream}, and the JSON views of
streams, engines and health.  Every error a client can cause or meet is a
JSON C{{"error": ...}} with a proper status, never a traceback.
"""

import hmac
import json
import re

import attrs
from klein import Klein
from klein.resource import KleinResource
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..errors import BadRequest, Forbidden, NotFound, ProxyError, Unauthorized, Unavailable
from ..metrics import DROPPED_LIMIT, HLS_PLAYLIST, HLS_SEGMENT
from ..stream.registry import StreamRegistry
from . import views
from .limits import ClientLimits, is_loopback
from .playlist import Playlist
from .site import ProxySite
from .status import asset, status_view

_HASH = re.compile(r"[0-9a-fA-F]{40}")
_SEGMENT = re.compile(r"([0-9]{1,15})\.ts")
_KEY_PARAMS = ("id", "infohash")

#: The methods of RFC 9110 (and PATCH), spelt as they must be: method names
#: are case-sensitive, and werkzeug, which would match C{get} to a C{GET}
#: route, must not see any other.
KNOWN_METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"}
)


def stream_key(args: dict) -> tuple[str, str]:
    """
    The stream key (lowercased hex) and the parameter name the player used.
    Exactly one of C{id} and C{infohash}, given once, must be there.
    """
    given = [name for name in _KEY_PARAMS if name.encode() in args]
    if not given:
        raise BadRequest("missing stream id: use ?id=<40 hex> or ?infohash=<40 hex>")
    if len(given) > 1:
        raise BadRequest("give either id or infohash, not both")
    param = given[0]
    values = args[param.encode()]
    if len(values) != 1:
        raise BadRequest(f"{param} given more than once")
    return checked_key(values[0], param), param


def checked_key(raw: bytes | str, what: str = "stream key") -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if not _HASH.fullmatch(raw):
        raise BadRequest(f"{what} must be 40 hexadecimal characters")
    return raw.lower()


def json_body(request, value, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(value).encode() + b"\n"


@attrs.define(eq=False)
class ProxyWeb:
    """
    The routes, bound to one L{StreamRegistry}.
    """

    app = Klein()
    # A path with doubled slashes is not one of ours: werkzeug would answer
    # it with a redirect to the merged path, rendered by http_error as a 308
    # without a Location.
    app.url_map.merge_slashes = False
    log = Logger()

    streams: StreamRegistry
    admin_token: str | None = None
    limits: ClientLimits | None = None
    playlist: Playlist = Playlist()

    def resource(self):
        return _Routes(self.app)

    # Players

    @app.route("/ace/getstream", methods=["GET", "HEAD"])
    async def getstream(self, request):
        key, param = stream_key(request.args)
        request.setHeader(b"Content-Type", b"video/mp2t")
        request.setHeader(b"Cache-Control", b"no-cache, no-store")
        if request.method == b"HEAD":
            return b""
        self._check_new_stream(key, request)
        done = await self.streams.attach(key, param, request)
        await done
        return None

    @app.route("/ace/manifest.m3u8", methods=["GET", "HEAD"])
    async def manifest(self, request):
        """
        The stream as HLS: a live playlist of segments cut from the same
        window, and the same engine session, as C{/ace/getstream}'s.
        """
        key, param = stream_key(request.args)
        if request.method == b"HEAD":
            request.setHeader(b"Content-Type", b"application/vnd.apple.mpegurl")
            return b""
        self._check_new_stream(key, request)
        stream, viewer = await self.streams.watch(key, param, request)
        with viewer.asking():
            body = await stream.hls.playlist()
        self.streams.metrics.hls_requests.labels(kind=HLS_PLAYLIST).inc()
        return self._hls_answer(request, viewer, body, b"application/vnd.apple.mpegurl")

    @app.route("/hls/<key>/<name>", methods=["GET", "HEAD"])
    async def hls_segment(self, request, key, name):
        key = checked_key(key)
        match = _SEGMENT.fullmatch(name)
        if match is None:
            raise NotFound(f"no segment {name[:32]!r}: segments are named <number>.ts")
        stream, viewer = await self.streams.watch(key, None, request)
        body = await stream.hls.segment(int(match.group(1)))
        metrics = self.streams.metrics
        metrics.hls_requests.labels(kind=HLS_SEGMENT).inc()
        metrics.sent_bytes.inc(len(body))
        return self._hls_answer(request, viewer, body, b"video/mp2t")

    @staticmethod
    def _hls_answer(request, viewer, body: bytes, content_type: bytes) -> bytes:
        """
        An HLS answer, which counts as the viewer's sign of life.  The
        playlist changes with every segment, so it is never cached.
        """
        viewer.sent(len(body))
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-cache, no-store")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    @app.route("/playlist.m3u", methods=["GET", "HEAD"])
    def playlist_m3u(self, request):
        return self.playlist.render(request)

    # Inspection and control

    @app.route("/streams", methods=["GET"])
    async def streams(self, request):
        status = request.args.get(b"status", [None])[-1]
        if status is not None:
            status = status.decode("latin-1")
        admin = self._is_admin(request)
        return json_body(request, await views.streams_view(self.streams, status, admin))

    @app.route("/streams/<key>", methods=["GET"])
    async def stream(self, request, key):
        admin = self._is_admin(request)
        return json_body(request, await views.stream_view(self.streams, checked_key(key), admin))

    @app.route("/streams/<key>", methods=["DELETE"])
    async def delete_stream(self, request, key):
        self._check_admin(request)
        key = checked_key(key)
        if await self.streams.stop_stream(key, "stopped through the API"):
            return json_body(request, {"stopped": key})
        # Its owner is another worker, which was asked to stop it.
        return json_body(request, {"stopping": key}, 202)

    @app.route("/engines", methods=["GET"])
    async def engines(self, request):
        admin = self._is_admin(request)
        return json_body(request, await views.engines_view(self.streams, admin))

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        """
        The worker's Prometheus metrics, public: aggregates, with no stream
        key, player or engine URL in them, and engine ids, which
        C{/engines} shows anyone.
        """
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = self.streams.metrics.render(accept)
        request.setHeader(b"Content-Type", content_type.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    @app.route("/health", methods=["GET"])
    def health(self, request):
        health = views.health_view(self.streams)
        return json_body(request, health, 200 if health["status"] == "ok" else 503)

    # The status page (see status.py)

    @app.route("/", methods=["GET"])
    def status_page(self, request):
        return asset(request, "index.html")

    @app.route("/status.js", methods=["GET"])
    def status_script(self, request):
        return asset(request, "status.js")

    @app.route("/status.css", methods=["GET"])
    def status_style(self, request):
        return asset(request, "status.css")

    @app.route("/status", methods=["GET"])
    async def status_json(self, request):
        return json_body(request, await status_view(self.streams, self._is_admin(request)))

    def _check_new_stream(self, key: str, request) -> None:
        """
        A request that would start a stream (none plays here for its key)
        takes one of its address's new streams of the minute, so that one
        client alone cannot make the engines open C{max_streams} swarms.
        Joining a stream that plays is free.  Nothing waits between this
        and L{StreamRegistry.attach} deciding to start the stream.
        """
        if self.limits is not None and key not in self.streams.streams:
            try:
                self.limits.take_new_stream(self.limits.key(request.getClientAddress()), key)
            except Unavailable:
                self.streams.metrics.players_dropped.labels(reason=DROPPED_LIMIT).inc()
                raise

    def _check_admin(self, request) -> None:
        """
        State-changing calls need the admin token when one is configured;
        without one they are allowed from loopback only.
        """
        refusal = self._admin_refusal(request)
        if refusal is not None:
            raise refusal

    def _is_admin(self, request) -> bool:
        """
        Whether C{request} may see the details of the views (players'
        addresses, engine URLs, playback sessions): the rule of L{_check_admin},
        without refusing the request.
        """
        return self._admin_refusal(request) is None

    def _admin_refusal(self, request) -> Unauthorized | Forbidden | None:
        if self.admin_token:
            given = request.getHeader(b"authorization") or b""
            expected = f"Bearer {self.admin_token}".encode()
            if not hmac.compare_digest(given, expected):
                return Unauthorized("a valid admin token is required")
            return None
        if not is_loopback(getattr(request.getClientAddress(), "host", "")):
            return Forbidden("admin actions are allowed from loopback only")
        return None

    # Errors

    @app.handle_errors(ProxyError)
    def proxy_error(self, request, failure: Failure):
        error = failure.value
        if error.status == 401:
            request.setHeader(b"WWW-Authenticate", b"Bearer")
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            request.setHeader(b"Retry-After", b"%d" % retry_after)
        return json_body(request, {"error": error.message}, error.status)

    @app.handle_errors(HTTPException)
    def http_error(self, request, failure: Failure):
        error = failure.value
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            request.setHeader(b"Allow", ", ".join(error.valid_methods).encode())
        return json_body(request, {"error": error.name.lower()}, error.code)

    @app.handle_errors(Exception)
    def unexpected_error(self, request, failure: Failure):
        self.log.failure("unexpected error answering {uri}", failure, uri=request.uri)
        return json_body(request, {"error": "internal error"}, 500)


def make_site(streams: StreamRegistry, config, exempt=is_loopback) -> ProxySite:
    """
    The HTTP site of a worker: its routes, behind the hardened channel of
    L{ProxySite}, and no traceback ever shown.  Its timers and the
    new-stream window run on the registry's clock.

    @param exempt: which client hosts the per-address limits spare
        (loopback ones by default).
    """
    tuning = config.tuning
    limits = ClientLimits.from_tuning(tuning, streams.clock, exempt)
    web = ProxyWeb(
        streams, config.admin_token, limits, Playlist(config.channels, config.trusted_proxies)
    )
    return ProxySite(web.resource(), limits, tuning.header_timeout, reactor=streams.clock)


class _Routes(KleinResource):
    """
    Klein's resource, with three of its own answers put right: a method
    that is not one of L{KNOWN_METHODS}, spelt in capitals, gets a JSON 501
    (werkzeug would take C{get} for C{GET}); a URL that is not UTF-8 gets a
    JSON 400 instead of Klein's plain text; and a path that starts with
    C{//} is not found, where Klein, which joins the path's segments, would
    serve C{//health} as C{/health}.
    """

    def render(self, request):
        if request.method not in KNOWN_METHODS:
            method = request.method.decode("latin-1")[:32]
            return json_body(request, {"error": f"method {method} is not implemented"}, 501)
        try:
            request.getRequestHostname().decode("utf-8")
            b"/".join(request.prepath + request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            return json_body(request, {"error": "the URL is not valid UTF-8"}, 400)
        if request.path.startswith(b"//"):
            return json_body(request, {"error": "not found"}, 404)
        return super().render(request)
