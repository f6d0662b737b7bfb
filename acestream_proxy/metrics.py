"""
The worker's Prometheus metrics: one L{CollectorRegistry} per daemon (never
prometheus_client's global one, so that two daemons in one process, as in
the tests, count apart), its families, and the few helpers that keep them
true at the moments things happen.

Nothing here is recomputed on a scrape: every value is moved where the
event it counts happens (a player joins or leaves, a stream changes state,
a chunk is delivered, an engine answers), so that a scrape costs the same
however many streams and players there are.  The fan-out counts its sent
bytes once per chunk for all its live players together, never per player.
"""

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from .constants import StreamState

#: The label a stream's state is counted under; the states not here
#: (stopping, error) are a stream on its way out, counted under none.
STATE_LABELS = {
    StreamState.STARTING: "starting",
    StreamState.STARTED: "live",
    StreamState.UNHEALTHY: "unhealthy",
    StreamState.RECONNECTING: "reconnecting",
}

#: Why a stream's engine connection was replaced.
RECONNECT_ENGINE_ENDED = "engine_ended"
RECONNECT_NO_DATA = "no_data"
RECONNECT_ENGINE_WITHDRAWN = "engine_withdrawn"

#: Why a player was dropped or refused.
DROPPED_WRITE_TIMEOUT = "write_timeout"
DROPPED_GHOST = "ghost"
DROPPED_LIMIT = "limit"

#: What an HLS request asked for.
HLS_PLAYLIST = "playlist"
HLS_SEGMENT = "segment"

#: The engine API calls timed, by the name the engine API gives them.
ENGINE_CALLS = {"getstream": "getstream", "stat": "stat", "stop": "stop", "get_version": "version"}

#: Seconds: a join to a running stream takes milliseconds, a new stream's
#: first byte waits for the engine (up to C{first_byte_timeout}).
JOIN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)
ENGINE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    # The worker's own CPU, memory and descriptors: read from /proc when
    # scraped, a handful of reads whatever the load.
    ProcessCollector(registry=registry)
    return registry


@attrs.define(eq=False)
class Metrics:
    """
    The metric families of one worker, in their own C{registry}.  A
    component built without being given the daemon's L{Metrics} makes its
    own, which nobody scrapes: that is how tests build parts alone.
    """

    registry: CollectorRegistry = attrs.field(factory=_registry)
    streams: Gauge = attrs.field(init=False)
    players: Gauge = attrs.field(init=False)
    engine_sessions: Gauge = attrs.field(init=False)
    received_bytes: Counter = attrs.field(init=False)
    sent_bytes: Counter = attrs.field(init=False)
    reconnects: Counter = attrs.field(init=False)
    player_skips: Counter = attrs.field(init=False)
    players_dropped: Counter = attrs.field(init=False)
    join_seconds: Histogram = attrs.field(init=False)
    engine_request_seconds: Histogram = attrs.field(init=False)
    owner_changes: Counter = attrs.field(init=False)
    store_errors: Counter = attrs.field(init=False)
    hls_segments: Counter = attrs.field(init=False)
    hls_requests: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.streams = Gauge(
            "aceproxy_streams", "Streams of this worker, by state.", ["state"], registry=registry
        )
        for label in STATE_LABELS.values():
            self.streams.labels(state=label)
        self.players = Gauge("aceproxy_players", "Players this worker serves.", registry=registry)
        self.engine_sessions = Gauge(
            "aceproxy_engine_sessions",
            "Engine playback sessions this worker reads, by engine id.",
            ["engine"],
            registry=registry,
        )
        self.received_bytes = Counter(
            "aceproxy_received_bytes",
            "Bytes this worker read from engines' playback bodies.",
            registry=registry,
        )
        self.sent_bytes = Counter(
            "aceproxy_sent_bytes",
            "Bytes of TS packets this worker handed to players' connections.",
            registry=registry,
        )
        self.reconnects = Counter(
            "aceproxy_reconnects",
            "Engine connections replaced by this worker, by why.",
            ["reason"],
            registry=registry,
        )
        for reason in (RECONNECT_ENGINE_ENDED, RECONNECT_NO_DATA, RECONNECT_ENGINE_WITHDRAWN):
            self.reconnects.labels(reason=reason)
        self.player_skips = Counter(
            "aceproxy_player_skips",
            "Times a player fell out of the window and jumped to the live edge.",
            registry=registry,
        )
        self.players_dropped = Counter(
            "aceproxy_players_dropped",
            "Players disconnected (write timeout, ghost) or refused at a limit, by why.",
            ["reason"],
            registry=registry,
        )
        for reason in (DROPPED_WRITE_TIMEOUT, DROPPED_GHOST, DROPPED_LIMIT):
            self.players_dropped.labels(reason=reason)
        self.join_seconds = Histogram(
            "aceproxy_join_seconds",
            "Seconds from a player's request to the first byte of its body.",
            buckets=JOIN_BUCKETS,
            registry=registry,
        )
        self.engine_request_seconds = Histogram(
            "aceproxy_engine_request_seconds",
            "Seconds an engine API call took, answered or failed, by call.",
            ["call"],
            buckets=ENGINE_BUCKETS,
            registry=registry,
        )
        for call in ENGINE_CALLS.values():
            self.engine_request_seconds.labels(call=call)
        self.hls_segments = Counter(
            "aceproxy_hls_segments",
            "HLS segments cut by the streams this worker owns.",
            registry=registry,
        )
        self.hls_requests = Counter(
            "aceproxy_hls_requests",
            "HLS playlists and segments this worker served, by kind.",
            ["kind"],
            registry=registry,
        )
        for kind in (HLS_PLAYLIST, HLS_SEGMENT):
            self.hls_requests.labels(kind=kind)
        self.owner_changes = Counter(
            "aceproxy_owner_changes",
            "Streams this worker took over from an owner that was gone or handed them over.",
            registry=registry,
        )
        self.store_errors = Counter(
            "aceproxy_store_errors",
            "Store operations that failed (Redis unreachable, slow or refusing).",
            registry=registry,
        )

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """
        The exposition of every family, and its content type: the text
        format, or OpenMetrics when the scraper's C{Accept} asks for it.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


@attrs.define(eq=False)
class StreamCount:
    """
    What one stream adds to the worker's gauges: one in its state's series,
    and, while it reads an engine session, one in that engine's.  The stream
    moves it when its state or session changes, and clears it when it stops.
    """

    metrics: Metrics
    state: str | None = None
    engine: str | None = None

    def set_state(self, state: StreamState | None) -> None:
        label = STATE_LABELS.get(state)
        if label != self.state:
            if self.state is not None:
                self.metrics.streams.labels(state=self.state).dec()
            if label is not None:
                self.metrics.streams.labels(state=label).inc()
            self.state = label

    def set_engine(self, engine: str | None) -> None:
        if engine != self.engine:
            if self.engine is not None:
                self.metrics.engine_sessions.labels(engine=self.engine).dec()
            if engine is not None:
                self.metrics.engine_sessions.labels(engine=engine).inc()
            self.engine = engine

    def clear(self) -> None:
        self.set_state(None)
        self.set_engine(None)
