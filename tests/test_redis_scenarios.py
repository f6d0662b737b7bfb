"""
The seed's four scenarios with the Redis store, through real sockets: the
simulated engines and the proxies (one, or two workers sharing one Redis)
listen on 127.0.0.1, players read with treq, and the seed's C{redis-cli}
checks are made on the keys themselves, with a client and a subscriber of
the test's own.
"""

import json
import socket
from collections import Counter

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from acestream_proxy.constants import PlayerField
from acestream_proxy.store import keys as keys
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.stream import Role

from .support import HASHES, Player, check_whole_packets, eventually, start_engine

KEY = HASHES[0]

#: Small numbers, so that the window turns over and cleanup comes quickly.
TUNING = dict(cleanup_grace=0.3, chunk_ttl=10.0, buffer_chunks=10, heartbeat_interval=0.5)

#: Every field the seed's client hash carries.
CLIENT_FIELDS = {
    PlayerField.WORKER,
    PlayerField.ADDRESS,
    PlayerField.USER_AGENT,
    PlayerField.CONNECTED_AT,
    PlayerField.LAST_HEARTBEAT,
    PlayerField.BYTES_SENT,
}


def check_bytes(player: Player, key: str = KEY) -> None:
    check_whole_packets(player.data, key)


def client_ids(*proxies, key: str = KEY) -> set[str]:
    """
    The ids the proxies gave their players of stream C{key}.
    """
    return {
        producer.info.id
        for proxy in proxies
        if key in proxy.registry.streams
        for producer in proxy.registry.streams[key].players
    }


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def hash_of(redis, name: str) -> dict[str, str]:
    flat = redis("HGETALL", name)
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def members(redis, key: str = KEY) -> set[str]:
    return {text(m) for m in redis("SMEMBERS", keys.clients(key))}


async def get_json(url: str):
    return await treq.json_content(await treq.get(url))


class EventTap:
    """
    C{redis-cli SUBSCRIBE ace_proxy:events:KEY}: raw RESP on a socket of its
    own, read without blocking whenever the test polls it.
    """

    def __init__(self, port: int, key: str = KEY) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        channel = keys.events(key).encode()
        self.sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%b\r\n" % (len(channel), channel))
        self.sock.setblocking(False)
        self.pending = b""
        self.subscribed = False
        self.events: list[dict] = []

    def close(self) -> None:
        self.sock.close()

    def poll(self) -> list[dict]:
        try:
            while data := self.sock.recv(65536):
                self.pending += data
        except BlockingIOError:
            pass
        while (parsed := _parse(self.pending, 0)) is not None:
            reply, end = parsed
            self.pending = self.pending[end:]
            if reply[0] == b"subscribe":
                self.subscribed = True
            elif reply[0] == b"message":
                self.events.append(json.loads(reply[2]))
        return self.events

    def named(self, name: str) -> list[dict]:
        return [e for e in self.poll() if e["event"] == name]

    async def wait(self, name: str) -> list[dict]:
        return await eventually(lambda: self.named(name), what=f"a {name} event")

    async def ready(self) -> None:
        """
        Wait for Redis to confirm the subscription, so that no event of the
        test is missed.
        """

        def confirmed() -> bool:
            self.poll()
            return self.subscribed

        await eventually(confirmed, what="the subscription")


def _parse(data: bytes, at: int):
    """
    One RESP reply from C{data[at:]} and where it ends, or L{None} while it
    has not all arrived.
    """
    line_end = data.find(b"\r\n", at)
    if line_end < 0:
        return None
    kind, rest = data[at : at + 1], data[at + 1 : line_end]
    at = line_end + 2
    if kind == b"$":
        size = int(rest)
        if len(data) < at + size + 2:
            return None
        return data[at : at + size], at + size + 2
    if kind == b"*":
        items = []
        for _ in range(int(rest)):
            parsed = _parse(data, at)
            if parsed is None:
                return None
            item, at = parsed
            items.append(item)
        return items, at
    if kind == b":":
        return int(rest), at
    return rest, at


@pytest.fixture
def redis(redis_server):
    """
    The test's own blocking client, as the seed's C{redis-cli}.
    """
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def tap(redis_server):
    taps = []

    def make(key: str = KEY) -> EventTap:
        taps.append(EventTap(redis_server.port, key))
        return taps[-1]

    yield make
    for made in taps:
        made.close()


@pytest.fixture
def two_engines():
    """
    A plain engine and a forwarded one, slow enough for five streams.
    """
    plain = start_engine(bitrate=1_000_000)
    forwarded = start_engine(bitrate=1_000_000)
    yield plain, forwarded
    pytest_twisted.blockon(plain.stop())
    pytest_twisted.blockon(forwarded.stop())


@pytest_twisted.ensureDeferred
async def test_single_client(redis_server, redis, engine, proxy_factory):
    """
    Scenario 1: one player; the clients set, the metadata hash, a growing
    buffer index and at most C{buffer_chunks} expiring chunks of whole TS
    packets, and the client's own expiring hash.
    """
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY), headers={"User-Agent": ["scenario-player"]})
    assert player.response.code == 200
    await player.wait_bytes(200 * PACKET_SIZE)
    check_bytes(player)

    [client_id] = client_ids(proxy)
    await eventually(lambda: members(redis) == {client_id}, what="the client in the set")

    meta = hash_of(redis, keys.metadata(KEY))
    assert meta["key"] == KEY
    assert meta["status"] == "started"
    assert meta["container_id"] == "engine-a"
    assert meta["engine_url"] == engine.url
    assert meta["playback_session_id"] in engine.engine.sessions
    assert meta["owner"] == proxy.registry.worker_id
    assert meta["playback_url"].startswith(engine.url)
    assert text(redis("GET", keys.owner(KEY))) == proxy.registry.worker_id

    first = int(redis("GET", keys.buffer_index(KEY)))
    assert first >= 1
    limit = TUNING["buffer_chunks"]
    await eventually(
        lambda: int(redis("GET", keys.buffer_index(KEY))) > max(first, limit),
        what="the buffer index to grow past the window",
    )
    check_chunks(redis)

    client = hash_of(redis, keys.client(KEY, client_id))
    assert CLIENT_FIELDS <= set(client), client
    assert client["worker"] == proxy.registry.worker_id
    assert client["address"] == "127.0.0.1"
    assert client["user_agent"] == "scenario-player"
    assert float(client["last_heartbeat"]) >= float(client["connected_at"])
    ttl = redis("PTTL", keys.client(KEY, client_id))
    assert 0 < ttl <= proxy.registry.tuning.ghost_client_timeout * 1000
    player.disconnect()


def check_chunks(redis, key: str = KEY) -> None:
    """
    C{KEYS ...:buffer:chunk:*}: between one and C{buffer_chunks} chunks,
    each expiring within C{chunk_ttl}, each whole TS packets.
    """
    names = redis.keys(keys.buffer_chunk_prefix(key) + "*")
    assert 1 <= len(names) <= TUNING["buffer_chunks"], names
    for name in names:
        ttl = redis("PTTL", name)
        data = redis("GET", name)
        if data is None:
            continue  # left the window since KEYS
        assert 0 < ttl <= TUNING["chunk_ttl"] * 1000, (name, ttl)
        assert data[0] == 0x47
        assert len(data) % PACKET_SIZE == 0


@pytest_twisted.ensureDeferred
async def test_three_clients_on_two_workers_share_one_engine_session(
    redis_server, redis, engine, proxy_factory
):
    """
    Scenario 2: three players over two workers sharing Redis: one engine
    session, three members in the clients set, one stream with three
    clients on either worker's C{/streams}.
    """
    first = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    second = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    players = [await Player.open(first.stream_url(KEY))]
    await players[0].wait_bytes(20 * PACKET_SIZE)
    players.append(await Player.open(second.stream_url(KEY)))
    players.append(await Player.open(first.stream_url(KEY)))
    for player in players:
        assert player.response.code == 200
        await player.wait_bytes(300 * PACKET_SIZE)
        check_bytes(player)

    assert first.registry.streams[KEY].role is Role.OWNER
    assert second.registry.streams[KEY].role is Role.FOLLOWER
    assert len(engine.engine.getstream_calls) == 1
    assert len(engine.engine.sessions) == 1
    assert engine.engine.playback_connections == 1

    ids = client_ids(first, second)
    assert len(ids) == 3
    await eventually(lambda: members(redis) == ids, what="three clients in the set")
    workers = {hash_of(redis, keys.client(KEY, cid))["worker"] for cid in ids}
    assert workers == {first.registry.worker_id, second.registry.worker_id}

    for proxy in (first, second):
        streams = await get_json(proxy.url + "/streams?status=started")
        assert [(s["key"], s["players"], s["container_id"]) for s in streams] == [
            (KEY, 3, "engine-a")
        ]
        assert streams[0]["owner"] == first.registry.worker_id
    for player in players:
        player.disconnect()


@pytest_twisted.ensureDeferred
async def test_killed_player_is_cleaned_up(redis_server, redis, tap, engine, proxy_factory):
    """
    Scenario 3: a killed player leaves the clients set at once; after the
    grace the engine is told to stop and no key of the stream is left.  The
    event channel shows the stream's life, each event with its worker and
    time.
    """
    events = tap()
    await events.ready()
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(50 * PACKET_SIZE)
    check_bytes(player)
    session_id = next(iter(engine.engine.sessions))
    [client_id] = client_ids(proxy)
    await eventually(lambda: members(redis) == {client_id}, what="the client in the set")
    await events.wait("chunk_added")

    player.disconnect()
    left_at = reactor.seconds()
    await eventually(lambda: members(redis) == set(), what="the client gone from the set")
    await eventually(lambda: session_id in engine.engine.stopped, what="engine told to stop")
    assert reactor.seconds() - left_at >= TUNING["cleanup_grace"] - 0.05
    await eventually(lambda: not proxy.registry.streams, what="session stopped")
    assert members(redis) == set()
    assert redis("EXISTS", keys.metadata(KEY)) == 0
    await eventually(lambda: redis.keys(keys.PREFIX + ":stream:*") == [], what="no stream key")

    worker = proxy.registry.worker_id
    [connected] = await events.wait("client_connected")
    assert connected["client_id"] == client_id
    added = events.named("chunk_added")
    assert [e["index"] for e in added] == list(range(1, len(added) + 1))
    [gone] = await events.wait("client_disconnected")
    assert (gone["client_id"], gone["remaining"]) == (client_id, 0)
    [stopping] = await events.wait("stream_stopping")
    for event in [connected, added[0], gone, stopping]:
        assert event["worker_id"] == worker
        assert isinstance(event["ts"], float)
    # The first chunks arrive before the player is attached.
    assert added[0]["ts"] <= connected["ts"] <= gone["ts"] <= stopping["ts"]
    assert added[-1]["ts"] <= stopping["ts"]
    await player.ended


@pytest_twisted.ensureDeferred
async def test_stream_ends_when_the_last_player_of_any_worker_leaves(
    redis_server, redis, engine, proxy_factory
):
    """
    Scenario 3 over two workers: while a player stays on either worker the
    stream plays on; when the last one leaves, the owner stops it.
    """
    owner = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    follower = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    on_owner = await Player.open(owner.stream_url(KEY))
    await on_owner.wait_bytes(20 * PACKET_SIZE)
    on_follower = await Player.open(follower.stream_url(KEY))
    await on_follower.wait_bytes(20 * PACKET_SIZE)
    session_id = next(iter(engine.engine.sessions))

    on_owner.disconnect()
    await eventually(lambda: len(members(redis)) == 1, what="one client left")
    await on_follower.more(100 * PACKET_SIZE, timeout=5 * TUNING["cleanup_grace"] + 5)
    check_bytes(on_follower)
    assert engine.engine.stopped == []
    assert owner.registry.streams[KEY].role is Role.OWNER

    on_follower.disconnect()
    await eventually(lambda: session_id in engine.engine.stopped, what="engine told to stop")
    await eventually(
        lambda: not owner.registry.streams and not follower.registry.streams, what="sessions stopped"
    )
    await eventually(lambda: redis.keys(keys.PREFIX + ":stream:*") == [], what="no stream key")


@pytest_twisted.ensureDeferred
async def test_load_balancing_across_workers(redis_server, two_engines, proxy_factory):
    """
    Scenario 4: five streams asked of two workers in turn: both count the
    streams in Redis, so the forwarded engine takes the first and every
    tie, three in all, and the plain one two.
    """
    plain, forwarded = two_engines
    configs = [plain.config("plain"), forwarded.config("forwarded", forwarded=True)]
    proxies = [await proxy_factory(configs, redis=redis_server.url, **TUNING) for _ in range(2)]
    players = []
    for n, key in enumerate(HASHES[:5]):
        player = await Player.open(proxies[n % 2].stream_url(key))
        await player.wait_bytes(10 * PACKET_SIZE)
        players.append(player)

    for proxy in proxies:
        streams = await get_json(proxy.url + "/streams?status=started")
        assert [s["key"] for s in streams] == HASHES[:5]
        assert streams[0]["container_id"] == "forwarded"
        assert Counter(s["container_id"] for s in streams) == {"forwarded": 3, "plain": 2}
        engines = await get_json(proxy.url + "/engines")
        assert {e["id"]: e["streams"] for e in engines} == {"plain": 2, "forwarded": 3}
    assert len(forwarded.engine.sessions) == 3
    assert len(plain.engine.sessions) == 2
    for player, key in zip(players, HASHES):
        check_bytes(player, key)
        player.disconnect()


@pytest_twisted.ensureDeferred
async def test_shared_stream_counts_once_on_every_worker(redis_server, two_engines, proxy_factory):
    """
    The same content asked of a second worker follows the first worker's
    session: every worker's C{/engines} counts it once, and the next new
    stream goes to the other engine whichever worker is asked.
    """
    plain, forwarded = two_engines
    configs = [plain.config("plain"), forwarded.config("forwarded", forwarded=True)]
    first = await proxy_factory(configs, redis=redis_server.url, **TUNING)
    second = await proxy_factory(configs, redis=redis_server.url, **TUNING)

    players = [await Player.open(first.stream_url(KEY))]
    await players[-1].wait_bytes(10 * PACKET_SIZE)
    players.append(await Player.open(second.stream_url(KEY)))
    await players[-1].wait_bytes(10 * PACKET_SIZE)
    for proxy in (first, second):
        engines = await get_json(proxy.url + "/engines")
        assert {e["id"]: e["streams"] for e in engines} == {"forwarded": 1, "plain": 0}

    other = HASHES[1]
    players.append(await Player.open(second.stream_url(other)))
    await players[-1].wait_bytes(10 * PACKET_SIZE)
    for proxy in (first, second):
        engines = await get_json(proxy.url + "/engines")
        assert {e["id"]: e["streams"] for e in engines} == {"forwarded": 1, "plain": 1}
    assert len(forwarded.engine.getstream_calls) == 1
    assert [call[1] for call in plain.engine.getstream_calls] == [other]
    for player, key in zip(players, [KEY, KEY, other]):
        check_bytes(player, key)
        player.disconnect()


@pytest_twisted.ensureDeferred
async def test_stream_details_look_the_same_with_either_store(
    redis_server, engine, proxy_factory
):
    """
    C{/streams/KEY} is the same document whichever store a worker uses:
    numbers are numbers, also in the client list.
    """
    embedded = await proxy_factory([engine.config("engine-a")], **TUNING)
    shared = await proxy_factory([engine.config("engine-a")], redis=redis_server.url, **TUNING)
    details = []
    for proxy, key in ((embedded, HASHES[0]), (shared, HASHES[1])):
        player = await Player.open(proxy.stream_url(key))
        await player.wait_bytes(20 * PACKET_SIZE)
        details.append(await get_json(f"{proxy.url}/streams/{key}"))
        player.disconnect()
    memory, redis = details
    assert type_names(redis) == type_names(memory)
    assert type_names(redis["players"][0]) == type_names(memory["players"][0])


def type_names(document: dict) -> dict[str, str]:
    return {name: type(value).__name__ for name, value in document.items()}


@pytest_twisted.ensureDeferred
async def test_redis_over_a_unix_socket(redis_server, redis, engine, proxy_factory):
    """
    C{unix:///path/redis.sock?db=0} works as well as C{redis://}: the
    stream plays, its keys are there while it runs and gone after.
    """
    proxy = await proxy_factory([engine.config("engine-a")], redis=redis_server.unix_url, **TUNING)
    player = await Player.open(proxy.stream_url(KEY))
    await player.wait_bytes(200 * PACKET_SIZE)
    check_bytes(player)
    assert redis("HGET", keys.metadata(KEY), "status") == b"started"
    assert len(redis("SMEMBERS", keys.clients(KEY))) == 1
    player.disconnect()
    await eventually(lambda: not redis.keys(keys.stream(KEY) + "*"), what="keys gone")
