"""
The worker's streams: one L{StreamSession} per stream key however many
players ask for it, the engine chosen for each new stream, and the
inspection data the web API shows.
"""

import uuid
from collections import Counter

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.logger import Logger

from .clients import ClientSupervisor
from .config import Tuning
from .constants import ACTIVE_STATES, Meta
from .engine_api import EngineAPI
from .engines import EngineRegistry
from .errors import NoEngine, NotFound, Unavailable
from .producer import ClientInfo
from .session import StreamSession
from .store import Store

#: Seconds a shutdown waits for players' last bytes to leave.
SHUTDOWN_DRAIN = 5.0


@attrs.define(eq=False)
class ProxyServer(MultiService):
    """
    Owns the stream sessions of this worker and the services that keep them
    healthy (engine probes, client heartbeats).
    """

    log = Logger()

    store: Store
    registry: EngineRegistry
    api: EngineAPI
    clock: object
    tuning: Tuning
    worker_id: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    sessions: dict = attrs.field(factory=dict, init=False)
    accepting: bool = attrs.field(default=True, init=False)
    _stopping: dict = attrs.field(factory=dict, init=False)
    _create_lock: DeferredLock = attrs.field(factory=DeferredLock, init=False)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.registry.setServiceParent(self)
        ClientSupervisor(
            self.store,
            self.clock,
            lambda: self.sessions.values(),
            self.tuning.heartbeat_interval,
            self.tuning.ghost_client_timeout,
        ).setServiceParent(self)

    # Players

    async def attach(self, key: str, param: str, request) -> Deferred:
        """
        Attach the player of C{request} to stream C{key}, starting the stream
        if this worker has no session for it.  Fire with a L{Deferred} that
        fires when the player's response should end.
        """
        if not self.accepting:
            raise Unavailable("the proxy is shutting down")
        session = self.sessions.get(key) or await self._create(key, param)
        await session.wait_ready()
        if session.key not in self.sessions or self.sessions[key] is not session:
            raise Unavailable(f"stream {key} stopped")
        address = request.getClientAddress()
        client = ClientInfo(
            id=uuid.uuid4().hex,
            key=key,
            address=getattr(address, "host", str(address)),
            user_agent=(request.getHeader(b"user-agent") or b"").decode("latin-1")[:256],
            connected_at=self.clock.seconds(),
        )
        return session.add_player(client, request).done

    async def _create(self, key: str, param: str) -> StreamSession:
        """
        Choose an engine and start a session.  Creations are serialised so
        that simultaneous requests for one key make one session, and
        simultaneous new streams see each other's load.
        """
        await self._create_lock.acquire()
        try:
            session = self.sessions.get(key)
            if session is not None:
                return session
            loads = await self.engine_loads()
            engine = self.registry.select(loads)
            if engine is None:
                raise NoEngine("no healthy engine is available")
            session = StreamSession(
                key=key,
                param=param,
                engine=engine,
                api=self.api,
                store=self.store,
                clock=self.clock,
                tuning=self.tuning,
                worker_id=self.worker_id,
                on_stopping=self._session_stopping,
            )
            self.sessions[key] = session
            self.log.info("stream {key}: starting on engine {engine}", key=key, engine=engine.id)
            session.start(after=self._stopping.get(key))
            return session
        finally:
            self._create_lock.release()

    async def engine_loads(self) -> Counter:
        """
        Active streams per engine id, as every worker sees them.
        """
        streams = await self.store.list_streams()
        return Counter(
            s.get(Meta.ENGINE_ID) for s in streams if s.get(Meta.STATE) in ACTIVE_STATES
        )

    # Stopping streams

    def stop_stream(self, key: str, why: str) -> Deferred:
        session = self.sessions.get(key)
        if session is None:
            raise NotFound(f"no stream {key}")
        return session.stop(why)

    def _session_stopping(self, session: StreamSession, stopped: Deferred) -> None:
        """
        A session began to stop: new players of its key get a new session,
        which starts once this one's cleanup is done.
        """
        key = session.key
        if self.sessions.get(key) is session:
            del self.sessions[key]
        self._stopping[key] = stopped

        def forget(result):
            if self._stopping.get(key) is stopped:
                del self._stopping[key]
            return result

        stopped.addBoth(forget)

    def stopService(self):
        """
        Refuse new players, stop every stream (players get a clean end, the
        engines are told to stop), close the players' connections once their
        last bytes are out, then stop the helper services.
        """
        self.accepting = False
        transports = [
            player.request.transport
            for session in self.sessions.values()
            for player in session.players
        ]
        for session in list(self.sessions.values()):
            session.stop("shutting down")
        d = DeferredList(list(self._stopping.values()), consumeErrors=True)
        d.addCallback(lambda _: self._close(transports))
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    def _close(self, transports: list) -> Deferred:
        """
        Close connections after their buffered bytes are sent, and fire when
        they are closed (or after L{SHUTDOWN_DRAIN} seconds, whichever is first):
        the reactor's own shutdown would drop unsent bytes.
        """
        for transport in transports:
            transport.loseConnection()
        deadline = self.clock.seconds() + SHUTDOWN_DRAIN
        done = Deferred()

        def check() -> None:
            open_ = [t for t in transports if getattr(t, "connected", False)]
            if not open_ or self.clock.seconds() >= deadline:
                done.callback(None)
            else:
                self.clock.callLater(0.02, check)

        check()
        return done

    # Inspection

    async def describe_streams(self, status: str | None = None) -> list[dict]:
        streams = await self.store.list_streams()
        described = []
        for meta in sorted(streams, key=lambda m: m.get(Meta.STARTED_AT, 0)):
            if status is not None and meta.get(Meta.STATE) != status:
                continue
            described.append(await self._describe(meta))
        return described

    async def describe_stream(self, key: str) -> dict:
        meta = await self.store.get_stream(key)
        if meta is None:
            raise NotFound(f"no stream {key}")
        described = await self._describe(meta)
        clients = await self.store.list_clients(key)
        described["clients"] = [
            {field: value for field, value in fields.items()} for fields in clients.values()
        ]
        return described

    async def _describe(self, meta: dict) -> dict:
        key = meta[Meta.KEY]
        session = self.sessions.get(key)
        clients = await self.store.list_clients(key)
        described = {
            "key": key,
            "status": meta.get(Meta.STATE),
            "container_id": meta.get(Meta.ENGINE_ID),
            "engine_url": meta.get(Meta.ENGINE_URL),
            "clients": len(clients),
            "started_at": _number(meta.get(Meta.STARTED_AT)),
            "bytes_in": _number(meta.get(Meta.BYTES_IN)) or 0,
            "playback_session_id": meta.get(Meta.PLAYBACK_SESSION_ID),
            "owner": meta.get(Meta.OWNER),
            "health": meta.get(Meta.HEALTH),
            "reconnects": _number(meta.get(Meta.RECONNECTS)) or 0,
            "buffer_index": await self.store.buffer.latest(key),
        }
        if session is not None:
            described["bytes_in"] = session.bytes_in
            described["last_data_at"] = session.last_data_at
        return described

    async def describe_engines(self) -> list[dict]:
        loads = await self.engine_loads()
        return [engine.describe(loads.get(engine.id, 0)) for engine in self.registry.engines]

    def describe_health(self) -> dict:
        return {
            "status": "ok" if self.accepting else "stopping",
            "worker_id": self.worker_id,
            "streams": len(self.sessions),
            "clients": sum(len(s.players) for s in self.sessions.values()),
            "engines_healthy": sum(1 for e in self.registry.engines if e.healthy),
            "store": self.store.kind,
        }


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

