"""
C{GET /metrics}: the worker's Prometheus metrics, scraped from a real proxy
on a real socket while a player streams from the simulated engine, and read
back with prometheus_client's own parser.  What each event adds (a join, a
reconnection, a refusal, a dropped player, a skip, a takeover, a failed
store operation) is checked where it happens: through sockets where that is
quick, on a L{Clock} where it takes timers.
"""

import json
import re
from pathlib import Path

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from acestream_proxy.constants import Role
from acestream_proxy.errors import Unavailable
from acestream_proxy.metrics import Metrics
from acestream_proxy.store.redis import RedisStore
from acestream_proxy.stream.mpegts import PACKET_SIZE

from .fakes import FakeRequest, packets
from .redis_server import free_port
from .support import HASHES, Player, StreamStops, eventually, watched
from .test_ownership import KEY as CLUSTER_KEY
from .test_ownership import LEASE, kill, owner_and_followers
from .test_reconnect import KEY, started

DASHBOARD = Path(__file__).parent.parent / "contrib" / "grafana-dashboard.json"

TOKEN = "metrics-test-token"

FAST = dict(cleanup_grace=0.2, heartbeat_interval=0.2)

#: The families the metrics issue names, each to be exposed and charted.
ISSUE_FAMILIES = {
    "aceproxy_streams",
    "aceproxy_players",
    "aceproxy_engine_sessions",
    "aceproxy_received_bytes",
    "aceproxy_sent_bytes",
    "aceproxy_reconnects",
    "aceproxy_player_skips",
    "aceproxy_players_dropped",
    "aceproxy_join_seconds",
    "aceproxy_engine_request_seconds",
    "aceproxy_owner_changes",
    "aceproxy_store_errors",
}

#: The families of HLS, charted too.
HLS_FAMILIES = {"aceproxy_hls_segments", "aceproxy_hls_requests"}


def samples(text: str) -> dict:
    """
    Every sample of an exposition, by name and labels, as prometheus_client
    parses it.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found[(name, frozenset(labels.items()))]


def of(metrics: Metrics) -> dict:
    """
    The samples of a registry, exposed and parsed as a scrape would be.
    """
    body, _ = metrics.render(None)
    return samples(body.decode())


async def scrape(proxy, headers=None) -> tuple[object, dict]:
    response = await treq.get(proxy.url + "/metrics", headers=headers)
    return response, samples((await treq.content(response)).decode())


# --- a real proxy, a real player -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_scrape_while_a_player_streams(engine, proxy_factory, store_url):
    """
    During a stream: one player, one live stream on one engine session, a
    join timed, getstream timed, bytes in and out that grow as it plays;
    once it ended, the gauges are back to nothing.  The page is public
    (an admin token is set and not given), in the text format.
    """
    proxy = await watched(
        proxy_factory, [engine.config("engine-a")], redis=store_url, admin_token=TOKEN, **FAST
    )
    player = await Player.open(proxy.stream_url(HASHES[0]))
    await player.wait_bytes(200 * PACKET_SIZE)

    response, first = await scrape(proxy)
    assert response.code == 200
    content_type = response.headers.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"text/plain; version=0.0.4")
    assert value(first, "aceproxy_players") == 1
    assert value(first, "aceproxy_streams", state="live") == 1
    for state in ("starting", "unhealthy", "reconnecting"):
        assert value(first, "aceproxy_streams", state=state) == 0
    assert value(first, "aceproxy_engine_sessions", engine="engine-a") == 1
    assert value(first, "aceproxy_join_seconds_count") == 1
    assert 0 < value(first, "aceproxy_join_seconds_sum") < 10
    assert value(first, "aceproxy_engine_request_seconds_count", call="getstream") >= 1
    assert value(first, "aceproxy_engine_request_seconds_count", call="version") >= 1
    assert value(first, "aceproxy_received_bytes_total") >= len(player.data)
    assert value(first, "aceproxy_sent_bytes_total") >= 200 * PACKET_SIZE
    assert value(first, "aceproxy_reconnects_total", reason="engine_ended") == 0
    assert value(first, "aceproxy_players_dropped_total", reason="limit") == 0

    await player.more(300 * PACKET_SIZE)
    _, second = await scrape(proxy)
    for name in ("aceproxy_received_bytes_total", "aceproxy_sent_bytes_total"):
        assert value(second, name) >= value(first, name) + 300 * PACKET_SIZE, name
    # Everything sent is whole packets of what the one player got.
    assert value(second, "aceproxy_sent_bytes_total") % PACKET_SIZE == 0

    stream = proxy.registry.streams[HASHES[0]]
    player.disconnect()
    await StreamStops.of(proxy.registry).stopped(stream)
    _, after = await scrape(proxy)
    assert value(after, "aceproxy_players") == 0
    for state in ("starting", "live", "unhealthy", "reconnecting"):
        assert value(after, "aceproxy_streams", state=state) == 0
    assert value(after, "aceproxy_engine_sessions", engine="engine-a") == 0
    assert value(after, "aceproxy_engine_request_seconds_count", call="stop") >= 1
    assert value(after, "aceproxy_join_seconds_count") == 1


@pytest_twisted.ensureDeferred
async def test_openmetrics_when_asked(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")])
    response = await treq.get(
        proxy.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    body = (await treq.content(response)).decode()
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(
        b"application/openmetrics-text"
    )
    assert body.rstrip().endswith("# EOF")
    assert "aceproxy_players 0.0" in body


@pytest_twisted.ensureDeferred
async def test_an_engine_reset_counts_a_reconnection(engine, proxy_factory):
    proxy = await watched(proxy_factory, [engine.config("engine-a")], **FAST)
    player = await Player.open(proxy.stream_url(HASHES[0]))
    await player.wait_bytes(100 * PACKET_SIZE)
    assert engine.engine.drop_playback() == 1
    await eventually(lambda: len(engine.engine.getstream_calls) == 2, what="a second session")
    await player.more(300 * PACKET_SIZE)

    _, found = await scrape(proxy)
    assert value(found, "aceproxy_reconnects_total", reason="engine_ended") == 1
    assert value(found, "aceproxy_reconnects_total", reason="no_data") == 0
    assert value(found, "aceproxy_streams", state="live") == 1
    # The old session was stopped, the new one is the only one held.
    assert value(found, "aceproxy_engine_sessions", engine="engine-a") == 1
    assert value(found, "aceproxy_engine_request_seconds_count", call="getstream") == 2
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_player_refused_at_a_limit_is_counted(engine, proxy_factory, store_url):
    proxy = await proxy_factory(
        [engine.config("engine-a")], redis=store_url, max_clients_per_stream=1
    )
    first = await Player.open(proxy.stream_url(HASHES[0]))
    await first.wait_bytes(100 * PACKET_SIZE)
    second = await Player.open(proxy.stream_url(HASHES[0]))
    assert second.response.code == 503

    _, found = await scrape(proxy)
    assert value(found, "aceproxy_players_dropped_total", reason="limit") == 1
    assert value(found, "aceproxy_players") == 1
    # Refused before it was a player: no join timed for it.
    assert value(found, "aceproxy_join_seconds_count") == 1
    first.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_dashboard_uses_only_metrics_the_proxy_exposes(engine, proxy_factory):
    """
    Every metric name the shipped Grafana dashboard queries is one a scrape
    of a proxy that has streamed holds.
    """
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if "expr" in target
    ]
    assert len(exprs) >= 10
    # Every name anywhere in it: queries, the worker variable, descriptions.
    used = set(re.findall(r"\b(?:aceproxy|process)_[a-z_]+", text))
    queried = {name for expr in exprs for name in re.findall(r"\baceproxy_[a-z_]+", expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in queried}
    # Each family of the issue, and of HLS, has a panel.
    assert families == ISSUE_FAMILIES | HLS_FAMILIES

    proxy = await proxy_factory([engine.config("engine-a")])
    player = await Player.open(proxy.stream_url(HASHES[0]))
    await player.wait_bytes(100 * PACKET_SIZE)
    response = await treq.get(proxy.url + "/metrics")
    families = list(text_string_to_metric_families((await treq.content(response)).decode()))
    names = {family.name for family in families}
    assert ISSUE_FAMILIES | HLS_FAMILIES <= names
    # A name is a family's (as a description gives it) or a series' (as a
    # query does: a counter's _total, a histogram's _bucket, _sum, _count).
    names |= {sample.name for family in families for sample in family.samples}
    assert used <= names, used - names
    player.disconnect()


# --- timers and events, on a Clock ---------------------------------------------------------


def test_state_gauge_follows_silence_and_reconnection():
    """
    The stream's state series and its session move at the changes: live,
    unhealthy after the silence, reconnecting (one reconnection, for no
    data) with no session held while the engine refuses a new one, live again on the new
    session, then nothing once it stopped.
    """
    clock = Clock()
    server, api, _, attached, stream = started(clock, no_data_timeout=10, reconnect_after=30)
    metrics = server.metrics

    def states() -> dict:
        found = of(metrics)
        return {
            state: value(found, "aceproxy_streams", state=state)
            for state in ("starting", "live", "unhealthy", "reconnecting")
        }

    def sessions() -> float:
        return value(of(metrics), "aceproxy_engine_sessions", engine="engine-a")

    assert states() == {"starting": 0, "live": 1, "unhealthy": 0, "reconnecting": 0}
    assert sessions() == 1
    clock.pump([1] * 10)
    assert states() == {"starting": 0, "live": 0, "unhealthy": 1, "reconnecting": 0}

    api.failing.add("engine-a")
    clock.pump([1] * 30)
    assert states() == {"starting": 0, "live": 0, "unhealthy": 0, "reconnecting": 1}
    assert sessions() == 0
    assert value(of(metrics), "aceproxy_reconnects_total", reason="no_data") == 1

    # The first attempt failed; the next one, after its back-off, opens a
    # session, and the stream is live again with its first data.
    api.failing.clear()
    clock.advance(0.5)
    assert sessions() == 1
    assert states()["reconnecting"] == 1
    api.readers[-1].dataReceived(packets(500, 20))
    assert states() == {"starting": 0, "live": 1, "unhealthy": 0, "reconnecting": 0}
    assert sessions() == 1
    assert value(of(metrics), "aceproxy_reconnects_total", reason="no_data") == 1

    stream.stop("test over")
    clock.advance(0)
    assert states() == {"starting": 0, "live": 0, "unhealthy": 0, "reconnecting": 0}
    assert sessions() == 0
    assert value(of(metrics), "aceproxy_players") == 0


def test_sent_bytes_are_what_the_players_were_sent():
    """
    Counted once per chunk for all live players, plus each catch-up: the
    sum of every player's own count, exactly.
    """
    clock = Clock()
    server, api, _, _, stream = started(clock)
    second = FakeRequest()
    Deferred.fromCoroutine(server.attach(KEY, "id", second))
    reader = api.readers[0]
    for n in range(5):
        reader.dataReceived(packets(50 + 10 * n, 10))
    producers = list(stream.players)
    assert len(producers) == 2
    total = sum(producer.bytes_sent for producer in producers)
    # Each got the first 50 packets (the second by catching up) and 50 live.
    assert total == 2 * 100 * PACKET_SIZE
    found = of(server.metrics)
    assert value(found, "aceproxy_sent_bytes_total") == total
    assert value(found, "aceproxy_received_bytes_total") == 100 * PACKET_SIZE
    assert value(found, "aceproxy_players") == 2
    assert value(found, "aceproxy_join_seconds_count") == 2


def test_a_player_that_fell_behind_counts_a_skip():
    clock = Clock()
    server, api, request, _, stream = started(clock, buffer_chunks=3)
    (producer,) = stream.players
    producer.pauseProducing()
    for n in range(6):
        api.readers[0].dataReceived(packets(50 + 10 * n, 10))
    producer.resumeProducing()
    assert producer.skips == 1
    found = of(server.metrics)
    assert value(found, "aceproxy_player_skips_total") == 1
    assert value(found, "aceproxy_sent_bytes_total") == producer.bytes_sent


def test_a_player_whose_socket_stays_full_is_counted_dropped():
    clock = Clock()
    server, _, request, _, stream = started(clock, write_timeout=5, ghost_client_timeout=60)
    (producer,) = stream.players
    producer.pauseProducing()
    clock.advance(5)
    assert producer.finished and request.transport.disconnecting
    found = of(server.metrics)
    assert value(found, "aceproxy_players_dropped_total", reason="write_timeout") == 1
    assert value(found, "aceproxy_players_dropped_total", reason="ghost") == 0
    assert value(found, "aceproxy_players") == 0


def test_a_ghost_player_is_counted_dropped():
    clock = Clock()
    server, _, _, _, stream = started(
        clock, write_timeout=600, ghost_client_timeout=30, heartbeat_interval=10
    )
    (producer,) = stream.players
    producer.pauseProducing()
    # Its last heartbeat is the one of the round after it paused (it had
    # moved since the round before): a ghost the ghost timeout after that.
    clock.pump([10] * 5)
    assert producer.finished
    found = of(server.metrics)
    assert value(found, "aceproxy_players_dropped_total", reason="ghost") == 1
    assert value(found, "aceproxy_players_dropped_total", reason="write_timeout") == 0
    assert value(found, "aceproxy_players") == 0


def test_a_takeover_counts_an_owner_change():
    """
    Two workers on one store: the follower holds no engine session and
    has changed no owner; once the owner died and the follower took the
    stream over, it counts one owner change and holds the session.
    """
    c = owner_and_followers("worker-a", "worker-b")
    dead, survivor = c.workers
    before = of(survivor.registry.metrics)
    assert value(before, "aceproxy_owner_changes_total") == 0
    assert value(before, "aceproxy_streams", state="live") == 1
    assert ("aceproxy_engine_sessions", frozenset({("engine", "engine-a")})) not in before
    assert value(of(dead.registry.metrics), "aceproxy_engine_sessions", engine="engine-a") == 1

    kill(dead)
    c.run(2 * LEASE, step=0.25, until=lambda: survivor.role is Role.OWNER)
    c.run(2)
    after = of(survivor.registry.metrics)
    assert value(after, "aceproxy_owner_changes_total") == 1
    assert value(after, "aceproxy_streams", state="live") == 1
    assert value(after, "aceproxy_engine_sessions", engine="engine-a") == 1
    assert survivor.registry.streams[CLUSTER_KEY].role is Role.OWNER
    c.shut_down(survivor)


@pytest_twisted.ensureDeferred
async def test_failed_store_operations_are_counted():
    """
    A Redis store whose Redis does not answer (nothing listens on its
    port): each operation that fails counts.
    """
    metrics = Metrics()
    store = RedisStore(
        url=f"redis://127.0.0.1:{free_port()}/0",
        reactor=reactor,
        worker_id="worker-1",
        buffer_chunks=10,
        chunk_ttl=10,
        ghost_client_timeout=10,
        owner_lease=10,
        op_timeout=1,
        metrics=metrics,
    )
    store.startService()
    try:
        for _ in range(3):
            with pytest.raises(Unavailable):
                await store.get_stream(KEY)
        assert value(of(metrics), "aceproxy_store_errors_total") == 3
    finally:
        await store.stopService()
