"""
Several workers sharing streams through a real Redis (a C{redis-server}
started by each test on a free port): one engine session per stream whatever
the number of workers and players, Redis work that grows with chunks and not
with players, failover when the owner is killed, an owner that was frozen
stepping down, hand-over when it shuts down, and a Redis restart in the
middle of a stream.

Every wait is for an event or a condition with a deadline, never a fixed
sleep.
"""

from __future__ import annotations

import signal
import socket
import sys

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater

from acestream_proxy.store import keys as redis_keys
from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.stream.stream import Role
from acestream_proxy.testing.engine import content_tag
from acestream_proxy.testing.synthetic import verify

from .support import (
    HASHES,
    Player,
    check_whole_packets,
    eventually,
    start_engine,
    workers_of,
)
from .test_end_to_end import (  # noqa: F401 (spawn: fixture)
    PROXY_LISTENING,
    TWISTD,
    get_json,
    spawn,
    twistd,
)

KEY = HASHES[0]

#: Timers short enough for a lapsed lease, a ghost and an idle stream to be
#: seen within a test, long enough not to fire by accident.
FAST = dict(
    owner_lease=1.5,
    heartbeat_interval=0.5,
    ghost_client_timeout=3,
    cleanup_grace=1,
)


# --- fixtures and helpers ----------------------------------------------------


@pytest.fixture
def workers(engine, redis_server):
    """
    Start in-process workers on one Redis and one engine; each is stopped
    at teardown unless the test stopped it already.
    """
    yield from workers_of(engine, redis_server.url, FAST)


def check(player: Player, allowed_jumps: int = 0):
    return check_whole_packets(player.data, KEY, allowed_jumps)


def buffer_index(client) -> int:
    return int(client("GET", redis_keys.buffer_index(KEY)) or 0)


def stream_keys(client) -> list[str]:
    return client.keys(f"{redis_keys.stream(KEY)}*")


def stream_meta(client) -> dict:
    flat = client("HGETALL", redis_keys.metadata(KEY))
    return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


def members(client) -> list[str]:
    return [m.decode() for m in client("SMEMBERS", redis_keys.clients(KEY))]


def session_timers(session) -> list:
    """
    The reactor's pending calls of C{session}'s own timers (its lease and
    its follower's poll): none once it has stopped.
    """
    return [
        call
        for call in reactor.getDelayedCalls()
        if isinstance(call.func, LoopingCall) and getattr(call.func.f, "__self__", None) is session
    ]


# --- two workers, one stream ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_workers_share_one_engine_session(engine, redis_server, workers):
    """
    A player on each of two workers: one engine session, the second worker
    follows the first one's buffer, and both players get the broadcast
    whole, in order and packet-aligned.
    """
    first = await workers()
    second = await workers()
    owner_player = await Player.open(first.stream_url(KEY))
    await owner_player.wait_bytes(100 * PACKET_SIZE)
    follower_player = await Player.open(second.stream_url(KEY))
    assert (owner_player.response.code, follower_player.response.code) == (200, 200)

    await follower_player.wait_bytes(300 * PACKET_SIZE)
    await owner_player.more(300 * PACKET_SIZE)
    check(owner_player)
    check(follower_player)
    assert first.registry.streams[KEY].role is Role.OWNER
    assert second.registry.streams[KEY].role is Role.FOLLOWER
    assert engine.engine.getstream_calls == [("id", KEY)]
    assert len(engine.engine.sessions) == 1
    assert engine.engine.playback_connections == 1
    client = redis_server.client()
    assert client("GET", redis_keys.owner(KEY)) == first.registry.worker_id.encode()
    assert len(await first.registry.store.list_players(KEY)) == 2

    # The follower's last player leaves: it stops following (no timer of
    # its session is left), and the owner's player streams on.
    following = second.registry.streams[KEY]
    follower_player.disconnect()
    await eventually(lambda: KEY not in second.registry.streams, what="the follower stopped")
    assert session_timers(following) == []
    await owner_player.more(300 * PACKET_SIZE)
    check(owner_player)
    assert members(client) == [next(iter(first.registry.streams[KEY].players)).info.id]


# --- Redis work grows with chunks, not with players ------------------------------

#: Chunks each measurement spans.
MEASURED_CHUNKS = 40


def command_counts(client) -> dict[str, int]:
    """
    Calls per command since Redis started, from C{INFO commandstats}.
    """
    info = client("INFO", "commandstats").decode()
    counts = {}
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            stats = dict(field.split("=") for field in fields.split(","))
            counts[name] = int(stats["calls"])
    return counts


async def commands_per_chunk(client, owner_session) -> tuple[float, dict]:
    """
    Redis commands per chunk, over L{MEASURED_CHUNKS} chunks, not counting
    this function's own C{INFO} and C{GET}.  The owner's session tells when
    enough chunks went by, so that waiting costs Redis nothing.
    """
    before, start = command_counts(client), buffer_index(client)
    await eventually(
        lambda: owner_session.fanout.last_index >= start + MEASURED_CHUNKS, what="chunks"
    )
    end = buffer_index(client)
    after = command_counts(client)
    delta = {
        name: after.get(name, 0) - before.get(name, 0)
        for name in after
        if after.get(name, 0) != before.get(name, 0) and name != "info"
    }
    delta["get"] -= 1
    return sum(delta.values()) / (end - start), delta


async def join(proxy, count: int) -> list[Player]:
    players = [await Player.open(proxy.stream_url(KEY)) for _ in range(count)]
    for player in players:
        await player.wait_bytes(50 * PACKET_SIZE)
    return players


async def heartbeat_round(client, proxy) -> dict:
    """
    The Redis commands of one round of the worker's client heartbeats.
    """
    heartbeats = proxy.registry.heartbeats
    before = command_counts(client)
    await heartbeats.tick()
    after = command_counts(client)
    return {
        name: after[name] - before.get(name, 0)
        for name in after
        if after[name] != before.get(name, 0) and name != "info"
    }


@pytest_twisted.ensureDeferred
async def test_redis_commands_do_not_grow_with_players(redis_server, workers):
    """
    Commands per chunk (C{INFO commandstats}, which counts the commands a
    script runs too) with 20 players on the follower, then 20 on the owner
    too, are those with one player on each, within 10 % plus a small
    constant for the timers that tick by time, not by chunk.  Client
    heartbeats are kept out of the chunk measurement (they come every
    heartbeat_interval and cost a few commands per player, by the seed's
    one-hash-per-client schema) and measured apart.  Run with C{-s} to see
    the numbers.
    """
    slow_heartbeats = dict(heartbeat_interval=60, ghost_client_timeout=180)
    first = await workers(**slow_heartbeats)
    second = await workers(**slow_heartbeats)
    client = redis_server.client()
    await join(first, 1)
    await join(second, 1)
    owner_session = first.registry.streams[KEY]
    assert second.registry.streams[KEY].role is Role.FOLLOWER

    one, one_detail = await commands_per_chunk(client, owner_session)
    one_round = await heartbeat_round(client, second)
    await join(second, 19)
    follower_20, follower_detail = await commands_per_chunk(client, owner_session)
    twenty_round = await heartbeat_round(client, second)
    await join(first, 19)
    both_20, both_detail = await commands_per_chunk(client, owner_session)

    report = (
        f"Redis commands per chunk over {MEASURED_CHUNKS} chunks (owner + follower players):"
        f"\n  1 + 1:   {one:.2f} {one_detail}"
        f"\n  1 + 20:  {follower_20:.2f} {follower_detail}"
        f"\n  20 + 20: {both_20:.2f} {both_detail}"
        f"\nfollower heartbeat round, 1 player: {sum(one_round.values())} {one_round}"
        f"\nfollower heartbeat round, 20 players: {sum(twenty_round.values())} {twenty_round}"
    )
    print(report)
    assert follower_20 <= one * 1.10 + 0.25, report
    assert both_20 <= one * 1.10 + 0.25, report
    # A follower's heartbeat round writes each of its players once (one
    # script of a few commands) and reads none back: only the owner lists
    # the clients, looking for those of dead workers.
    assert sum(twenty_round.values()) - sum(one_round.values()) <= 19 * 7, report


# --- hand-over ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_owner_shutting_down_hands_the_stream_over(engine, redis_server, workers):
    """
    An owner that shuts down while another worker still has a player gives
    up its lease without stopping the engine session or deleting the
    stream's keys; the other worker takes the stream over, on the same
    engine session, and its player keeps streaming with at most one gap.
    """
    first = await workers()
    second = await workers()
    client = redis_server.client()
    owner_player = await Player.open(first.stream_url(KEY))
    await owner_player.wait_bytes(100 * PACKET_SIZE)
    player = await Player.open(second.stream_url(KEY))
    await player.wait_bytes(200 * PACKET_SIZE)
    (session_id,) = engine.engine.sessions
    index = buffer_index(client)
    handing_over = first.registry.streams[KEY]

    await first.service.stopService()
    assert await owner_player.ended.addTimeout(5, reactor) is True
    assert engine.engine.stopped == []
    assert client("EXISTS", redis_keys.metadata(KEY)) == 1
    assert session_timers(handing_over) == []

    session = second.registry.streams[KEY]
    await eventually(lambda: session.role is Role.OWNER, what="the takeover")
    await player.more(300 * PACKET_SIZE)
    check(player, allowed_jumps=1)
    assert client("GET", redis_keys.owner(KEY)) == second.registry.worker_id.encode()
    assert buffer_index(client) > index
    assert list(engine.engine.sessions) == [session_id]
    assert engine.engine.stopped == []
    assert len(engine.engine.getstream_calls) == 1


# --- Redis restarted -----------------------------------------------------------------


def client_ids(*proxies) -> set[str]:
    return {
        producer.info.id
        for proxy in proxies
        for session in proxy.registry.streams.values()
        for producer in session.players
    }


@pytest_twisted.ensureDeferred
async def test_redis_restarted_mid_stream(engine, redis_server, workers):
    """
    Redis goes away and comes back empty: the owner's players keep getting
    the broadcast meanwhile and /health says Redis is down; once Redis is
    back the workers reconnect on their own, write the stream's keys again,
    serve new players, the follower's player streams again, and when every
    player has left no key of the stream is left behind.
    """
    first = await workers()
    second = await workers()
    owner_player = await Player.open(first.stream_url(KEY))
    await owner_player.wait_bytes(100 * PACKET_SIZE)
    follower_player = await Player.open(second.stream_url(KEY))
    await follower_player.wait_bytes(100 * PACKET_SIZE)
    # Far enough for the restarted buffer's index to stay below the
    # follower's for the rest of the test: it must notice the restart.
    client = redis_server.client()
    await eventually(lambda: buffer_index(client) >= 30, what="30 chunks")
    before = buffer_index(client)
    client.close()

    redis_server.stop()
    health = await eventually_json(first.url + "/health", 503)
    assert (health["status"], health["redis"]) == ("degraded", "down"), health
    await owner_player.more(500 * PACKET_SIZE, timeout=3)
    assert first.registry.streams[KEY].role is Role.OWNER

    redis_server.start()
    for proxy in (first, second):
        health = await eventually_json(proxy.url + "/health", 200, timeout=8)
        assert health["redis"] == "up", health
    await follower_player.more(300 * PACKET_SIZE, timeout=5)
    client = redis_server.client()
    # It followed the buffer begun afresh, not waiting for its old index.
    assert buffer_index(client) < before
    await owner_player.more(300 * PACKET_SIZE, timeout=5)
    late_player = await Player.open(second.stream_url(KEY))
    await late_player.wait_bytes(300 * PACKET_SIZE, timeout=5)
    check(owner_player, allowed_jumps=1)
    check(follower_player, allowed_jumps=1)
    check(late_player)

    meta = await eventually(lambda: stream_meta(client), what="the metadata written again")
    assert meta["owner"] == first.registry.worker_id, meta
    assert client("GET", redis_keys.owner(KEY)) == first.registry.worker_id.encode()
    live = client_ids(first, second)
    await eventually(lambda: set(members(client)) == live, what="the clients written again")
    assert only_live_keys(client, live)
    assert len(engine.engine.sessions) == 1, engine.engine.state()
    sessions = [first.registry.streams[KEY], second.registry.streams[KEY]]

    for player in (owner_player, follower_player, late_player):
        player.disconnect()
    await eventually(lambda: not stream_keys(client), timeout=8, what="the keys removed")
    await eventually(lambda: not engine.engine.sessions, what="the engine session stopped")
    assert [session_timers(session) for session in sessions] == [[], []]


def only_live_keys(client, live: set[str]) -> list[str]:
    """
    The stream's keys, all of which belong to it now: its metadata, lease,
    buffer (no chunk past the index) and clients, and a hash for each
    client that is connected.
    """
    keys = stream_keys(client)
    index = buffer_index(client)
    fixed = {
        redis_keys.metadata(KEY),
        redis_keys.owner(KEY),
        redis_keys.buffer_index(KEY),
        redis_keys.clients(KEY),
    } | {redis_keys.client(KEY, cid) for cid in live}
    prefix = redis_keys.buffer_chunk_prefix(KEY)
    for key in keys:
        if key.startswith(prefix):
            assert 1 <= int(key[len(prefix) :]) <= index, (key, index)
        else:
            assert key in fixed, key
    assert fixed <= set(keys), fixed - set(keys)
    return keys


async def eventually_json(url: str, code: int, timeout: float = 5.0):
    """
    The JSON body of the first answer to C{url} with status C{code}.
    """
    found = []

    async def ask():
        response = await treq.get(url).addTimeout(2, reactor)
        body = await treq.json_content(response)
        if response.code == code:
            found.append(body)

    deadline = reactor.seconds() + timeout
    while not found:
        assert reactor.seconds() < deadline, f"{url} never answered {code}"
        await ask()
        if not found:
            await deferLater(reactor, 0.05, lambda: None)
    return found[0]


# --- failover between processes ------------------------------------------------------

FAILOVER_CONFIG = """\
[tuning]
owner_lease = 1.5
heartbeat_interval = 0.5
ghost_client_timeout = 3
cleanup_grace = 1
"""


@attrs.define
class WorkerPair:
    """
    Two C{twistd -n aceproxy} processes on one Redis and one engine, a
    player on each, and which of them owns the stream.
    """

    daemons: list
    urls: list[str]
    players: list[Player]
    ids: list[str]
    owner: int

    @property
    def survivor(self) -> int:
        return 1 - self.owner


async def start_worker_pair(
    spawn, tmp_path, engine, redis_url: str, settings: str = FAILOVER_CONFIG
) -> WorkerPair:
    config = tmp_path / "workers.toml"
    config.write_text(settings)
    daemons = [
        twistd(
            spawn,
            f"worker-{n}",
            "aceproxy",
            "--redis", redis_url,
            "--engine", engine.url,
            "--listen", "tcp:0:interface=127.0.0.1",
            "--config", str(config),
        )
        for n in range(2)
    ]
    urls, players = [], []
    for daemon in daemons:
        match = await daemon.wait_for_line(PROXY_LISTENING, timeout=20)
        urls.append(f"http://127.0.0.1:{match.group(1)}")
    for url in urls:
        players.append(await Player.open(f"{url}/ace/getstream?id={KEY}"))
        await players[-1].wait_bytes(100 * PACKET_SIZE)
    assert [p.response.code for p in players] == [200, 200]
    (stream,) = await get_json(urls[0] + "/streams")
    ids = [(await get_json(url + "/health"))["worker_id"] for url in urls]
    return WorkerPair(daemons, urls, players, ids, ids.index(stream["owner"]))


def worker_clients(client) -> dict[str, str]:
    """
    The stream's client ids in Redis, with the worker of each (empty once
    the client's hash has expired).
    """
    workers = {}
    for member in members(client):
        flat = client("HGETALL", redis_keys.client(KEY, member))
        fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        workers[member] = fields.get("worker", "")
    return workers


@pytest_twisted.ensureDeferred
async def test_killed_owner_fails_over_to_the_other_worker(engine, redis_server, spawn, tmp_path):
    """
    Two worker processes with a player each; the owner is killed.  The
    other worker takes the lease over and goes on with the buffer's index
    on the same engine session; its player keeps its connection and gets
    more of the broadcast with at most one gap; the dead worker's client is
    removed as a ghost.  Stopping the survivor then ends the stream: the
    engine session is stopped and no key of the stream is left.
    """
    pair = await start_worker_pair(spawn, tmp_path, engine, redis_server.url)
    daemons, urls, ids, owner, survivor = (
        pair.daemons, pair.urls, pair.ids, pair.owner, pair.survivor
    )
    player = pair.players[survivor]
    client = redis_server.client()
    dead_clients = {cid for cid, worker in worker_clients(client).items() if worker == ids[owner]}
    assert len(dead_clients) == 1
    (session_id,) = engine.engine.sessions
    index = buffer_index(client)

    daemons[owner].kill()
    await daemons[owner].wait_exit()
    await pair.players[owner].ended.addTimeout(5, reactor)
    received = len(player.data)
    await eventually(
        lambda: stream_meta(client).get("owner") == ids[survivor], what="the takeover"
    )
    (stream,) = await get_json(urls[survivor] + "/streams")
    assert stream["owner"] == ids[survivor], stream
    await player.wait_bytes(received + 300 * PACKET_SIZE)
    assert not player.ended.called
    check(player, allowed_jumps=1)
    assert buffer_index(client) > index
    assert list(engine.engine.sessions) == [session_id]
    assert engine.engine.stopped == []

    await eventually(
        lambda: not dead_clients & set(members(client)), timeout=8, what="the ghost removed"
    )
    assert set(worker_clients(client).values()) == {ids[survivor]}
    assert [client("EXISTS", redis_keys.client(KEY, cid)) for cid in dead_clients] == [0]

    daemons[survivor].send_signal("TERM")
    await daemons[survivor].wait_exit(10)
    assert daemons[survivor].stopped_cleanly(), daemons[survivor].output()
    assert engine.engine.stopped == [session_id]
    assert stream_keys(client) == []


def buffered_bytes(client) -> bytes:
    """
    The whole ring buffer as Redis holds it now, oldest chunk first.
    """
    index = buffer_index(client)
    names = [redis_keys.buffer_chunk(KEY, n) for n in range(1, index + 1)]
    return b"".join(chunk for chunk in client("MGET", *names) if chunk is not None)


@pytest_twisted.ensureDeferred
async def test_frozen_owner_steps_down_after_a_takeover(engine, redis_server, spawn, tmp_path):
    """
    An owner frozen (SIGSTOP) past its lease is taken over; once it runs
    again it finds the lease taken and becomes a follower, leaving the
    engine session to the new owner: one session, one playback connection,
    and a ring buffer written by one owner at a time (no chunk of the old
    owner's after the new one's), its player served from the buffer.
    """
    pair = await start_worker_pair(spawn, tmp_path, engine, redis_server.url)
    daemons, players, ids, owner, survivor = (
        pair.daemons, pair.players, pair.ids, pair.owner, pair.survivor
    )
    client = redis_server.client()
    (session_id,) = engine.engine.sessions

    daemons[owner].send_signal(signal.SIGSTOP)
    await eventually(
        lambda: stream_meta(client).get("owner") == ids[survivor], what="the takeover"
    )
    await players[survivor].more(300 * PACKET_SIZE)
    daemons[owner].send_signal(signal.SIGCONT)
    await daemons[owner].wait_for_line("lost ownership; following")
    received = len(players[owner].data)
    await players[owner].wait_bytes(received + 300 * PACKET_SIZE)
    await players[survivor].more(300 * PACKET_SIZE)

    check(players[survivor], allowed_jumps=1)
    check(players[owner], allowed_jumps=1)
    report = verify(buffered_bytes(client), allowed_jumps=1, content_tag=content_tag(KEY))
    assert report.ok, report.describe()
    assert list(engine.engine.sessions) == [session_id]
    assert engine.engine.playback_connections == 1
    assert stream_meta(client)["owner"] == ids[survivor]


# --- worker processes sharing one port ------------------------------------------------

#: Players of the shared-port tests, and the bitrate of their engine: low
#: enough for the test's own reactor to read them all at once.
SHARED_PORT_PLAYERS = 40
SHARED_PORT_BITRATE = 1_000_000


@pytest.fixture
def slow_engine():
    running = start_engine(bitrate=SHARED_PORT_BITRATE)
    yield running
    pytest_twisted.blockon(running.stop())


@pytest_twisted.ensureDeferred
async def test_worker_processes_share_one_port(slow_engine, redis_server, spawn):
    """
    Two C{twistd -n aceproxy --reuse-port} processes listen on one port of
    127.0.0.1 and share one Redis.  Players all connect to that port: the
    kernel spreads them over both workers, every one of them gets the
    broadcast gap-free, and the engine sees one session.
    """

    def worker(name: str, listen: str):
        return twistd(
            spawn,
            name,
            "aceproxy",
            "--reuse-port",
            "--listen", listen,
            "--redis", redis_server.url,
            "--engine", slow_engine.url,
        )

    # The first worker binds a free port, the second one that very port.
    first = worker("worker-1", "tcp:0:interface=127.0.0.1")
    port = int((await first.wait_for_line(PROXY_LISTENING, timeout=20)).group(1))
    second = worker("worker-2", f"tcp:{port}:interface=127.0.0.1")
    assert int((await second.wait_for_line(PROXY_LISTENING, timeout=20)).group(1)) == port

    per_worker = await players_through_one_port(port, slow_engine, redis_server)
    assert len(per_worker) == 2 and "" not in per_worker, per_worker
    await terminate(first, second)


@pytest_twisted.ensureDeferred
async def test_worker_processes_share_a_socket_activation_socket(
    slow_engine, redis_server, spawn
):
    """
    Two workers handed the same listening socket, as systemd hands
    C{aceproxy.socket} to each C{aceproxy@N} instance
    (C{--listen systemd:domain=INET:index=0}), share one Redis: both
    accept players, every player gets the broadcast gap-free, and the
    engine sees one session.
    """
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    port = listening.getsockname()[1]
    try:
        daemons = [
            socket_activated(
                spawn,
                f"worker-{n}",
                listening,
                "--redis", redis_server.url,
                "--engine", slow_engine.url,
            )
            for n in (1, 2)
        ]
    finally:
        listening.close()
    for daemon in daemons:
        await daemon.wait_for_line(PROXY_LISTENING, timeout=20)

    await players_through_one_port(port, slow_engine, redis_server)
    # Whichever worker accepts first gets a connection: each gets some.
    seen = set()
    for _ in range(200):
        response = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
        seen.add((await treq.json_content(response))["worker_id"])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    await terminate(*daemons)


def socket_activated(spawn, name: str, listening: socket.socket, *arguments: str):
    """
    C{twistd -n aceproxy --listen systemd:domain=INET:index=0 ARGUMENTS}
    given C{listening} as its descriptor 3, with C{LISTEN_PID},
    C{LISTEN_FDS} and C{LISTEN_FDNAMES} as systemd sets them.
    """
    command = (
        'script=$1; shift; '
        'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=aceproxy.socket exec "$0" -c "$script" '
        '-n --pidfile= aceproxy --listen systemd:domain=INET:index=0 "$@"'
    )
    return spawn(
        name,
        TWISTD,
        *arguments,
        executable="/bin/sh",
        argv0=["/bin/sh", "-c", command, sys.executable],
        childFDs={0: "w", 1: "r", 2: "r", 3: listening.fileno()},
    )


async def players_through_one_port(port: int, engine, redis_server) -> dict[str, int]:
    """
    L{SHARED_PORT_PLAYERS} players of C{KEY} on C{port}, the first one
    alone (its worker owns the stream), the others at once: each gets the
    broadcast gap-free, and the engine sees one session.  Returns how many
    players each worker serves, as their hashes in Redis tell.
    """
    url = f"http://127.0.0.1:{port}/ace/getstream?id={KEY}"
    players = [await Player.open(url)]
    await players[0].wait_bytes(50 * PACKET_SIZE)
    players += await gather(*(Player.open(url) for _ in range(SHARED_PORT_PLAYERS - 1)))
    assert [p.response.code for p in players] == [200] * SHARED_PORT_PLAYERS
    await gather(*(p.more(100 * PACKET_SIZE) for p in players))
    for player in players:
        check(player)
    assert engine.engine.getstream_calls == [("id", KEY)]
    assert len(engine.engine.sessions) == 1
    assert engine.engine.playback_connections == 1

    client = redis_server.client()
    await eventually(
        lambda: len(worker_clients(client)) == SHARED_PORT_PLAYERS, what="every player registered"
    )
    served = list(worker_clients(client).values())
    client.close()
    for player in players:
        player.disconnect()
    per_worker = {worker: served.count(worker) for worker in set(served)}
    print(f"players per worker: {per_worker}")
    return per_worker


async def terminate(*daemons) -> None:
    """
    SIGTERM each of C{daemons}; each stops cleanly.
    """
    for daemon in daemons:
        daemon.send_signal("TERM")
    for daemon in daemons:
        await daemon.wait_exit(10)
        assert daemon.stopped_cleanly(), daemon.output()


async def gather(*awaitables) -> list:
    """
    The results of C{awaitables}, run at once, in order.
    """
    results = await DeferredList(
        [a if isinstance(a, Deferred) else ensureDeferred(a) for a in awaitables],
        fireOnOneErrback=True,
        consumeErrors=True,
    )
    return [result for _, result in results]
