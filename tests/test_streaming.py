"""
The seed's scenarios against the embedded store, through real sockets: the
simulated engine and the proxy listen on 127.0.0.1, players read with treq,
and every player's bytes are checked packet by packet.
"""

from collections import Counter

import pytest_twisted
import treq

from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing.engine import content_tag
from acestream_proxy.testing.synthetic import verify

from .support import HASHES, Player, StreamStops, gone, start_engine

KEY = HASHES[0]


def check_bytes(player: Player, key: str = KEY, allowed_jumps: int = 0):
    report = verify(bytes(player.data), allowed_jumps=allowed_jumps, content_tag=content_tag(key))
    assert report.ok, report.describe()
    return report


@pytest_twisted.ensureDeferred
async def test_single_client(engine, proxy_factory):
    """
    Scenario 1: one player gets a TS body from the first byte, and the store
    shows its client, the stream's metadata and a filling buffer.
    """
    proxy = await proxy_factory([engine.config("engine-a")])
    player = await Player.open(proxy.stream_url(KEY))
    assert player.response.code == 200
    assert player.response.headers.getRawHeaders("content-type") == ["video/mp2t"]
    await player.wait_bytes(200 * PACKET_SIZE)
    report = check_bytes(player)
    assert report.data_packets > 150

    store = proxy.registry.store
    clients = await store.list_players(KEY)
    assert len(clients) == 1
    meta = await store.get_stream(KEY)
    assert meta["status"] == "started"
    assert meta["container_id"] == "engine-a"
    assert meta["playback_session_id"] in engine.engine.sessions
    assert await store.buffer.latest(KEY) >= 1
    assert store.buffer.count(KEY) >= 1
    assert engine.engine.getstream_calls == [("id", KEY)]
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_infohash_parameter_is_passed_on(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")])
    player = await Player.open(proxy.stream_url(KEY.upper(), param="infohash"))
    await player.wait_bytes(20 * PACKET_SIZE)
    assert engine.engine.getstream_calls == [("infohash", KEY)]
    streams = await treq.json_content(await treq.get(proxy.url + "/streams"))
    assert [s["key"] for s in streams] == [KEY]
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_three_clients_share_one_engine_session(engine, proxy_factory):
    """
    Scenario 2: three players, one engine session, three clients listed.
    """
    proxy = await proxy_factory([engine.config("engine-a")])
    players = [await Player.open(proxy.stream_url(KEY)) for _ in range(3)]
    for player in players:
        await player.wait_bytes(300 * PACKET_SIZE)
        check_bytes(player)
    assert len(engine.engine.getstream_calls) == 1
    assert len(engine.engine.sessions) == 1
    assert engine.engine.playback_connections == 1
    assert len(await proxy.registry.store.list_players(KEY)) == 3

    streams = await treq.json_content(await treq.get(proxy.url + "/streams?status=started"))
    assert len(streams) == 1
    assert streams[0]["key"] == KEY
    assert streams[0]["players"] == 3
    assert streams[0]["container_id"] == "engine-a"
    assert streams[0]["bytes_in"] > 0
    for player in players:
        player.disconnect()


@pytest_twisted.ensureDeferred
async def test_simultaneous_players_make_one_engine_session(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")])
    from twisted.internet.defer import Deferred, gatherResults

    players = await gatherResults(
        [Deferred.fromCoroutine(Player.open(proxy.stream_url(KEY))) for _ in range(6)]
    )
    for player in players:
        assert player.response.code == 200
        await player.wait_bytes(100 * PACKET_SIZE)
        check_bytes(player)
    assert len(engine.engine.getstream_calls) == 1
    assert len(engine.engine.sessions) == 1
    for player in players:
        player.disconnect()


@pytest_twisted.ensureDeferred
async def test_abrupt_disconnect_is_cleaned_up(engine, proxy_factory):
    """
    Scenario 3: a killed player is removed at once; after the grace the
    engine is told to stop and nothing of the stream is left.
    """
    proxy = await proxy_factory([engine.config("engine-a")], cleanup_grace=0.2)
    stops = StreamStops.watch(proxy.registry)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(50 * PACKET_SIZE)
    session_id = next(iter(engine.engine.sessions))
    stream = proxy.registry.streams[KEY]
    (producer,) = stream.players
    player.disconnect()

    await gone(producer)
    assert not stream.players, "the killed player is removed at once"
    assert not stream.stopping, "the stream waits for the grace"
    # The grace timer itself is tested on a Clock (tests/test_timers.py);
    # here its end is awaited, and what the stop did checked.
    await stops.stopped(stream)
    assert proxy.registry.streams == {}
    # Stopping waited for the engine's answer to the stop command, and the
    # engine ends a session's playback connections before it answers.
    assert engine.engine.stopped == [session_id]
    assert engine.engine.sessions == {}
    assert engine.engine.playback_connections == 0
    store = proxy.registry.store
    assert await store.list_players(KEY) == {}
    assert await store.get_stream(KEY) is None
    assert await store.buffer.latest(KEY) == 0
    assert await store.get_last_disconnect(KEY) is None
    streams = await treq.json_content(await treq.get(proxy.url + "/streams"))
    assert streams == []


@pytest_twisted.ensureDeferred
async def test_player_back_within_grace_reuses_the_session(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")], cleanup_grace=30)
    first = await Player.open(proxy.stream_url(KEY))
    await first.wait_bytes(50 * PACKET_SIZE)
    stream = proxy.registry.streams[KEY]
    (producer,) = stream.players
    first.disconnect()
    await gone(producer)
    assert not stream.players
    second = await Player.open(proxy.stream_url(KEY))
    await second.wait_bytes(50 * PACKET_SIZE)
    check_bytes(second)
    assert proxy.registry.streams[KEY] is stream
    assert len(engine.engine.getstream_calls) == 1
    assert engine.engine.stopped == []
    second.disconnect()


@pytest_twisted.ensureDeferred
async def test_load_balancing_prefers_forwarded_on_ties(proxy_factory):
    """
    Scenario 4: five streams over two engines: the forwarded engine takes the
    first and every tie, so it ends with three and the other with two.
    """
    plain = start_engine(bitrate=1_000_000)
    forwarded = start_engine(bitrate=1_000_000)
    try:
        proxy = await proxy_factory(
            [plain.config("plain"), forwarded.config("forwarded", forwarded=True)]
        )
        players = []
        for key in HASHES[:5]:
            player = await Player.open(proxy.stream_url(key))
            await player.wait_bytes(10 * PACKET_SIZE)
            players.append(player)
        streams = await treq.json_content(await treq.get(proxy.url + "/streams?status=started"))
        assert [s["key"] for s in streams] == HASHES[:5]
        assert streams[0]["container_id"] == "forwarded"
        assert Counter(s["container_id"] for s in streams) == {"forwarded": 3, "plain": 2}
        assert len(forwarded.engine.sessions) == 3
        assert len(plain.engine.sessions) == 2
        engines = await treq.json_content(await treq.get(proxy.url + "/engines"))
        assert {e["id"]: e["streams"] for e in engines} == {"plain": 2, "forwarded": 3}
        for player, key in zip(players, HASHES):
            check_bytes(player, key)
            player.disconnect()
    finally:
        await plain.stop()
        await forwarded.stop()


@pytest_twisted.ensureDeferred
async def test_unhealthy_engine_is_skipped(proxy_factory):
    sick = start_engine(faults={"version_fail"})
    well = start_engine()
    try:
        proxy = await proxy_factory([sick.config("sick", forwarded=True), well.config("well")])
        player = await Player.open(proxy.stream_url(KEY))
        await player.wait_bytes(10 * PACKET_SIZE)
        assert sick.engine.getstream_calls == []
        assert len(well.engine.getstream_calls) == 1
        engines = await treq.json_content(await treq.get(proxy.url + "/engines"))
        assert {e["id"]: e["healthy"] for e in engines} == {"sick": False, "well": True}
        player.disconnect()
    finally:
        await sick.stop()
        await well.stop()


@pytest_twisted.ensureDeferred
async def test_stream_details_and_delete(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")])
    players = [await Player.open(proxy.stream_url(KEY)) for _ in range(2)]
    await players[1].wait_bytes(20 * PACKET_SIZE)

    details = await treq.json_content(await treq.get(f"{proxy.url}/streams/{KEY}"))
    assert details["key"] == KEY
    assert details["status"] == "started"
    assert len(details["players"]) == 2
    assert {c["address"] for c in details["players"]} == {"127.0.0.1"}

    response = await treq.delete(f"{proxy.url}/streams/{KEY}")
    assert response.code == 200
    assert await treq.json_content(response) == {"stopped": KEY}
    for player in players:
        assert await player.ended is True, "the body must end with the chunked terminator"
        check_bytes(player)
    # The DELETE was answered once the stream had stopped, its engine
    # session included.
    assert engine.engine.stopped == [details["playback_session_id"]]
    assert proxy.registry.streams == {}
    missing = await treq.get(f"{proxy.url}/streams/{KEY}")
    assert missing.code == 404
    assert "error" in await treq.json_content(missing)


@pytest_twisted.ensureDeferred
async def test_head_starts_no_engine_session(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")])
    response = await treq.head(proxy.stream_url(KEY))
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["video/mp2t"]
    assert engine.engine.getstream_calls == []
    assert proxy.registry.streams == {}


@pytest_twisted.ensureDeferred
async def test_health(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")])
    response = await treq.get(proxy.url + "/health")
    assert response.code == 200
    health = await treq.json_content(response)
    assert health["status"] == "ok"
    assert health["store"] == "memory"
    assert health["engines_healthy"] == 1
