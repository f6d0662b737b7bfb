"""
Timer logic of the proxy, driven by L{task.Clock}: the cleanup grace, client
heartbeats and ghost removal, the first-byte timeout and engine probes.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from acestream_proxy.errors import EngineTimeout
from acestream_proxy.testing.synthetic import verify

from .fakes import FakeEngineAPI, FakeRequest, make_server, packets

KEY = "ab" * 20


def attach(server, request=None):
    request = request or FakeRequest()
    d = Deferred.fromCoroutine(server.attach(KEY, "id", request))
    return request, d


def started_server(clock, **tuning):
    """
    A running proxy with one player on KEY, its engine body fed once.
    """
    api = FakeEngineAPI()
    server = make_server(clock, api, **tuning)
    server.startService()
    request, attached = attach(server)
    api.readers[0].dataReceived(packets(0, 50))
    assert attached.called
    return server, api, request


def test_stream_stops_after_cleanup_grace():
    clock = Clock()
    server, api, request = started_server(clock, cleanup_grace=5)
    assert verify(request.transport.value().split(b"\r\n")[1]).ok
    request.producer.stopProducing()  # the connection is lost
    assert server.streams[KEY].players.producers == set()

    clock.advance(4.9)
    assert KEY in server.streams
    assert api.stops == []
    store = server.store
    assert store.get_last_disconnect(KEY).result == 0.0

    clock.advance(0.2)
    assert server.streams == {}
    assert api.stops == ["session-1"]
    assert store.list_streams().result == []
    assert store.get_last_disconnect(KEY).result is None


def test_player_back_within_grace_keeps_the_stream():
    clock = Clock()
    server, api, request = started_server(clock, cleanup_grace=5)
    request.producer.stopProducing()
    clock.advance(3)
    again, attached = attach(server)
    assert attached.called
    assert server.store.get_last_disconnect(KEY).result is None
    clock.advance(30)
    assert KEY in server.streams
    assert api.stops == []
    assert len(api.getstreams) == 1


def test_heartbeats_refresh_players_that_make_progress():
    clock = Clock()
    server, api, request = started_server(clock, heartbeat_interval=10, ghost_client_timeout=50)
    client_id = next(iter(server.store.list_players(KEY).result))
    clock.advance(10)
    api.readers[0].dataReceived(packets(50, 10))
    clock.advance(10)
    client = server.store.list_players(KEY).result[client_id]
    assert client["last_heartbeat"] == 20
    assert client["bytes_sent"] == 60 * 188


def test_ghost_client_is_removed_and_disconnected():
    """
    A player whose socket stays full (paused producer, no progress) stops
    heartbeating; after ghost_client_timeout it is removed and dropped.
    The healthy player next to it stays.
    """
    clock = Clock()
    server, api, ghost = started_server(
        clock, heartbeat_interval=10, ghost_client_timeout=50, cleanup_grace=5, write_timeout=600
    )
    healthy, _ = attach(server)
    ghost.producer.pauseProducing()
    # The ghost's bytes from before the pause count as progress at the first
    # heartbeat (t=10); from then on its heartbeat ages.
    for second in range(10, 70, 10):
        clock.advance(10)
        api.readers[0].dataReceived(packets(50 + second, 10))
    assert len(server.store.list_players(KEY).result) == 2
    assert not ghost.transport.disconnecting

    clock.advance(10)
    clients = server.store.list_players(KEY).result
    assert len(clients) == 1
    assert ghost.transport.disconnecting
    assert len(server.streams[KEY].players) == 1
    assert not healthy.transport.disconnecting


def test_player_whose_socket_stays_full_is_dropped_after_write_timeout():
    clock = Clock()
    server, api, stuck = started_server(clock, write_timeout=30, heartbeat_interval=100)
    healthy, _ = attach(server)
    stuck.producer.pauseProducing()
    clock.advance(29)
    assert not stuck.transport.disconnecting
    # Draining in time resets the timer.
    stuck.producer.resumeProducing()
    stuck.producer.pauseProducing()
    clock.advance(29)
    assert not stuck.transport.disconnecting
    clock.advance(1)
    assert stuck.transport.disconnecting
    assert len(server.streams[KEY].players) == 1
    assert not healthy.transport.disconnecting


def test_first_byte_timeout_fails_players_and_cleans_up():
    clock = Clock()
    api = FakeEngineAPI()
    server = make_server(clock, api, first_byte_timeout=20)
    server.startService()
    _, first = attach(server)
    _, second = attach(server)
    clock.advance(19)
    assert not first.called
    clock.advance(2)
    for attached in (first, second):
        failure = attached.result
        attached.addErrback(lambda f: None)
        assert failure.check(EngineTimeout)
    assert server.streams == {}
    assert api.stops == ["session-1"]
    assert server.store.list_streams().result == []


def test_engine_probes_mark_health():
    clock = Clock()
    api = FakeEngineAPI(healthy=False)
    server = make_server(clock, api, probe_interval=30)
    server.startService()
    engine = server.engines.engines[0]
    assert engine.healthy is False
    api.healthy = True
    clock.advance(29)
    assert engine.healthy is False
    clock.advance(1)
    assert engine.healthy is True
    server.stopService()
    assert clock.getDelayedCalls() == []
