"""
When a worker dies, the others notice it within C{worker_timeout}, not a
whole lease: its streams are taken over and its players removed at once,
with the default settings.  A stream can be stopped through any worker.

Two C{twistd -n aceproxy} processes share one redis-server and one
simulated engine; the owner is killed with SIGKILL.
"""

import json

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from acestream_proxy.config import Config, Tuning
from acestream_proxy.service import make_store
from acestream_proxy.store import keys as redis_keys
from acestream_proxy.store.redis import RedisStore
from acestream_proxy.stream.mpegts import PACKET_SIZE

from .test_end_to_end import get_json, spawn  # noqa: F401 (spawn: fixture)
from .test_workers import KEY, check, members, start_worker_pair, stream_meta, worker_clients

#: The defaults, but for a short grace so that the test need not wait.
DEFAULTS = "[tuning]\ncleanup_grace = 1\n"

#: How soon, with the default settings, players elsewhere must be fed again.
FED_AGAIN_WITHIN = 5.0


@pytest_twisted.ensureDeferred
async def test_a_killed_owner_is_replaced_within_seconds(engine, redis_server, spawn, tmp_path):
    """
    The survivor's player is fed again within 5 s of the owner's death; the
    dead worker's player is gone from the stream's players at once, not
    after ghost_client_timeout (50 s); the takeover counts as a
    reconnection; and once the last real player leaves, the engine session
    is stopped after the grace.
    """
    pair = await start_worker_pair(spawn, tmp_path, engine, redis_server.url, DEFAULTS)
    daemons, urls, ids, owner, survivor = (
        pair.daemons, pair.urls, pair.ids, pair.owner, pair.survivor
    )
    player = pair.players[survivor]
    client = redis_server.client()
    (session_id,) = engine.engine.sessions
    await _until(lambda: client("EXISTS", redis_keys.worker(ids[owner])) == 1, seconds=2)

    daemons[owner].kill()
    await daemons[owner].wait_exit()
    received = len(player.data)
    # Whatever the survivor still had in its window or could still read from
    # Redis (a chunk or two, up to chunk_bytes each), new chunks come from
    # its own engine reading once it owns the stream.
    await player.wait_bytes(received + 3 * Tuning().chunk_bytes, timeout=FED_AGAIN_WITHIN)
    assert stream_meta(client)["owner"] == ids[survivor]
    check(player, allowed_jumps=1)
    assert list(engine.engine.sessions) == [session_id]

    (stream,) = await get_json(urls[survivor] + "/streams")
    assert stream["players"] == 1, stream
    assert stream["reconnects"] >= 1, stream
    assert set(worker_clients(client).values()) == {ids[survivor]}

    player.disconnect()
    await _until(lambda: session_id in engine.engine.stopped, seconds=5)
    assert members(client) == []


@pytest_twisted.ensureDeferred
async def test_delete_through_a_follower_stops_the_stream(engine, redis_server, spawn, tmp_path):
    """
    DELETE /streams/{key} on the worker that does not own the stream asks
    its owner, through the events channel: 202, then the engine session is
    stopped and every player's body ends cleanly.
    """
    pair = await start_worker_pair(spawn, tmp_path, engine, redis_server.url, DEFAULTS)
    (session_id,) = engine.engine.sessions
    response = await treq.delete(f"{pair.urls[pair.survivor]}/streams/{KEY}")
    assert response.code == 202
    assert json.loads(await response.text()) == {"stopping": KEY}
    for player in pair.players:
        assert await player.ended.addTimeout(5, reactor) is True
    await _until(lambda: engine.engine.stopped == [session_id], seconds=5)


async def _until(predicate, seconds: float) -> None:
    """
    Wait for another process to do something, up to C{seconds}.
    """
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"not within {seconds}s")


async def started_store(url: str, worker_id: str) -> RedisStore:
    store = make_store(Config(redis=url), reactor, worker_id)
    store.startService()
    await store.get_owner(KEY)
    return store


@pytest_twisted.ensureDeferred
async def test_a_lease_goes_to_another_worker_only_once_its_holder_is_known_dead(redis_server):
    """
    Taking a lease says its holder runs, in the same script; another worker
    may take it over only once that liveness key has expired, and not
    while the holder keeps it alive.
    """
    client = redis_server.client()
    a = await started_store(redis_server.url, "worker-a")
    b = await started_store(redis_server.url, "worker-b")
    try:
        assert await a.acquire_owner(KEY)
        assert client("EXISTS", redis_keys.worker("worker-a")) == 1
        assert 0 < client("PTTL", redis_keys.worker("worker-a")) <= 3000
        assert await b.is_alive("worker-a")
        assert not await b.take_owner_from(KEY, "worker-a")
        assert await b.get_owner(KEY) == "worker-a"

        client("DEL", redis_keys.worker("worker-a"))  # as if it expired
        assert not await b.is_alive("worker-a")
        # Only the lease of the worker named: not one held by someone else.
        assert not await b.take_owner_from(KEY, "worker-c")
        assert await b.take_owner_from(KEY, "worker-a")
        assert await b.get_owner(KEY) == "worker-b"
        assert client("EXISTS", redis_keys.worker("worker-b")) == 1
        # The old holder's renewal fails: one owner at a time.
        assert not await a.renew_owner(KEY)

        await b.mark_gone()
        assert client("EXISTS", redis_keys.worker("worker-b")) == 0
    finally:
        await a.stopService()
        await b.stopService()
