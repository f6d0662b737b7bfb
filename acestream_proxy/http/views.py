"""
The JSON views of the API: streams (as every worker sees them, from the
store), one stream with its players, engines with their load, and this
worker's health.

Anyone may see keys, states, engine ids, counts and health.  The details
(players' addresses, user agents and ids, engine URLs, playback session
ids, from which anyone who reaches the engine could rebuild its URLs and
stop the session) are for admins only.
"""

from ..constants import Meta, PlayerField, Role
from ..errors import NotFound

#: What anyone may see of a stream.
PUBLIC_STREAM_FIELDS = frozenset(
    {
        "key",
        "status",
        "container_id",
        "players",
        "started_at",
        "bytes_in",
        "health",
        "reconnects",
        "buffer_index",
        "last_data_at",
    }
)

#: What anyone may see of an engine.
PUBLIC_ENGINE_FIELDS = frozenset({"id", "forwarded", "healthy", "streams"})


def _shown(described: dict, public: frozenset, admin: bool) -> dict:
    if admin:
        return described
    return {name: value for name, value in described.items() if name in public}


async def streams_view(registry, status: str | None = None, admin: bool = False) -> list[dict]:
    streams = await registry.store.list_streams()
    described = []
    for meta in sorted(streams, key=lambda m: float(m.get(Meta.STARTED_AT) or 0)):
        if status is not None and meta.get(Meta.STATE) != status:
            continue
        described.append(_shown(await _describe(registry, meta), PUBLIC_STREAM_FIELDS, admin))
    return described


async def stream_view(registry, key: str, admin: bool = False) -> dict:
    meta = await registry.store.get_stream(key)
    if meta is None:
        raise NotFound(f"no stream {key}")
    described = await _describe(registry, meta)
    if not admin:
        return _shown(described, PUBLIC_STREAM_FIELDS, admin)
    players = await registry.store.list_players(key)
    described["players"] = [
        {
            field: _number(value) if field in _NUMERIC_PLAYER_FIELDS else value
            for field, value in fields.items()
        }
        for fields in players.values()
    ]
    return described


async def _describe(registry, meta: dict) -> dict:
    key = meta[Meta.KEY]
    stream = registry.streams.get(key)
    players = await registry.store.list_players(key)
    described = {
        "key": key,
        "status": meta.get(Meta.STATE),
        "container_id": meta.get(Meta.ENGINE_ID),
        "engine_url": meta.get(Meta.ENGINE_URL),
        "players": len(players),
        "started_at": _number(meta.get(Meta.STARTED_AT)),
        "bytes_in": _number(meta.get(Meta.BYTES_IN)) or 0,
        "playback_session_id": meta.get(Meta.PLAYBACK_SESSION_ID),
        "owner": meta.get(Meta.OWNER),
        "health": meta.get(Meta.HEALTH),
        "reconnects": _number(meta.get(Meta.RECONNECTS)) or 0,
        "buffer_index": await registry.store.buffer.latest(key),
        "bytes_out": _bytes_out(players, stream),
        "uptime": _uptime(registry, meta),
    }
    if stream is not None and stream.role is Role.OWNER:
        described["bytes_in"] = stream.bytes_in
        described["last_data_at"] = stream.last_data_at
    return described


def _bytes_out(players: dict, stream) -> int:
    """
    The bytes sent to the stream's players, every worker's: this worker's
    players counted as of now, the others' as of their last heartbeat.
    Summed when asked (the status page's bitrate out is its change between
    two polls), so that the fan-out keeps no stream-wide counter per chunk.
    """
    local = {p.info.id: p.bytes_sent for p in stream.players} if stream is not None else {}
    stored = sum(
        _number(fields.get(PlayerField.BYTES_SENT)) or 0
        for pid, fields in players.items()
        if pid not in local
    )
    return int(stored) + sum(local.values())


def _uptime(registry, meta: dict) -> float | None:
    """
    Seconds since the stream started, on this worker's clock, so that a
    browser whose clock differs still shows the right age.
    """
    started = _number(meta.get(Meta.STARTED_AT))
    if not isinstance(started, (int, float)):
        return None
    return max(0.0, registry.clock.seconds() - started)


async def engines_view(registry, admin: bool = False) -> list[dict]:
    loads = await registry.engine_loads()
    return [
        _shown(engine.describe(loads.get(engine.id, 0)), PUBLIC_ENGINE_FIELDS, admin)
        for engine in registry.engines.engines
    ]


def health_view(registry) -> dict:
    """
    C{status} is C{ok} only while the daemon accepts players, its store
    can be reached and an engine has passed its health probe; otherwise
    C{degraded} (or C{stopping}), with the C{reason} in one line.  A daemon
    with no healthy engine can serve nobody: saying C{ok} would send a load
    balancer's players to it.
    """
    store_up = registry.store.available
    engines_healthy = len(registry.engines.healthy())
    reasons = []
    if not store_up:
        reasons.append(f"the {registry.store.kind} store is unavailable")
    if not engines_healthy:
        reasons.append(f"no healthy engine: {registry.engines.problems()}")
    health = {
        "status": "stopping" if not registry.accepting else "degraded" if reasons else "ok",
        "worker_id": registry.worker_id,
        "streams": len(registry.streams),
        "players": sum(len(s.players) for s in registry.streams.values()),
        "engines_healthy": engines_healthy,
        "store": registry.store.kind,
    }
    if registry.store.kind == "redis":
        health["redis"] = "up" if store_up else "down"
    if reasons and registry.accepting:
        health["reason"] = "; ".join(reasons)
    return health


#: Player fields shown as numbers whichever store kept them.
_NUMERIC_PLAYER_FIELDS = frozenset(
    {
        PlayerField.CONNECTED_AT,
        PlayerField.LAST_HEARTBEAT,
        PlayerField.BYTES_SENT,
        PlayerField.SKIPS,
    }
)


def _number(value):
    """
    Metadata numbers come back as text from Redis; show them as numbers.
    """
    if value is None or isinstance(value, (int, float)):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() else number
