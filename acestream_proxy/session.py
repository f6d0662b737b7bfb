"""
One stream's life in the worker that owns it: open a playback session on the
chosen engine, read its body into the ring buffer and the local fan-out, keep
players attached, and stop everything (engine session included) when the last
player has been gone for C{cleanup_grace} seconds.
"""

from typing import Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .buffer import Chunk, ChunkWindow, frame
from .config import Tuning
from .constants import ClientField, Meta, StreamState
from .engine_api import EngineAPI, Playback
from .engines import Engine
from .errors import EngineError, EngineTimeout, ProxyError
from .follower import BufferFollower
from .producer import ClientInfo, ClientProducer
from .reader import EngineReader
from .store import Store

#: Appends a store may have in flight before the engine's transport is paused.
MAX_PENDING_APPENDS = 8


@attrs.define(eq=False)
class StreamSession:
    """
    @ivar param: the query parameter name the first player used (C{infohash}
        or C{id}); the engine is asked with the same name.
    @ivar on_stopping: called once, as the session begins to stop, with the
        session and a L{Deferred} that fires when it is over and its keys are
        gone.
    """

    log = Logger()

    key: str
    param: str
    engine: Engine
    api: EngineAPI
    store: Store
    clock: object
    tuning: Tuning
    worker_id: str
    on_stopping: Callable[["StreamSession", Deferred], None]
    state: StreamState = StreamState.STARTING
    playback: Playback | None = None
    started_at: float = 0.0
    last_data_at: float | None = None
    reconnects: int = 0
    follower: BufferFollower = attrs.field(init=False)
    players: set = attrs.field(factory=set, init=False)
    _reader: EngineReader | None = attrs.field(default=None, init=False)
    _starting: Deferred | None = attrs.field(default=None, init=False)
    _first_data: Deferred | None = attrs.field(default=None, init=False)
    _ready: Failure | bool = attrs.field(default=False, init=False)
    _waiters: list = attrs.field(factory=list, init=False)
    _cleanup_call: object = attrs.field(default=None, init=False)
    _pending: int = attrs.field(default=0, init=False)
    _stopped: Deferred | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        window = ChunkWindow(self.tuning.buffer_chunks, self.tuning.chunk_ttl)
        self.follower = BufferFollower(window, self.tuning.join_chunks)
        self.started_at = self.clock.seconds()

    @property
    def bytes_in(self) -> int:
        return self._reader.bytes_in if self._reader is not None else 0

    # Starting

    def start(self, after: Deferred | None = None) -> None:
        """
        Begin opening the engine session; players wait with L{wait_ready}.
        C{after} (the stop of an earlier session of the same key) is awaited
        first, so that its cleanup cannot remove this session's keys.
        """
        self._starting = Deferred.fromCoroutine(self._start(after))

    async def _start(self, after: Deferred | None) -> None:
        try:
            if after is not None:
                await after
            await self.store.put_stream(self.key, self.metadata())
            self.playback = await self.api.getstream(self.engine, self.key, self.param)
            await self.store.put_stream(self.key, self.metadata())
            response = await self.api.open_playback(self.engine, self.playback)
            self._first_data = Deferred()
            self._reader = EngineReader(self._on_data, self._on_end)
            response.deliverBody(self._reader)
            try:
                await self._first_data.addTimeout(self.tuning.first_byte_timeout, self.clock)
            except TimeoutError:
                raise EngineTimeout(f"engine {self.engine.id} sent no data in time")
        except CancelledError:
            # stop() cancelled the start and does the cleanup itself.
            self._starting = None
            return
        except Exception as e:
            self._starting = None
            if isinstance(e, ProxyError):
                error = e
                self.log.warn(
                    "stream {key} failed to start on {engine}: {why}",
                    key=self.key,
                    engine=self.engine.id,
                    why=e.message,
                )
            else:
                error = EngineError(f"engine {self.engine.id} failed")
                self.log.failure("stream {key} failed to start", key=self.key)
            self._set_ready(Failure(error))
            self.stop("start failed")
            return
        self._starting = None
        self.state = StreamState.STARTED
        await self.store.put_stream(self.key, self.metadata())
        self.log.info(
            "stream {key} started on {engine} ({session})",
            key=self.key,
            engine=self.engine.id,
            session=self.playback.playback_session_id,
        )
        self._set_ready(True)
        if not self.players:
            self._player_gone()

    def _set_ready(self, result: Failure | bool) -> None:
        self._ready = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    def wait_ready(self) -> Deferred:
        """
        Fire when the stream has data for players, or fail with the
        L{ProxyError} that stopped it.  Cancelling one waiter leaves the
        others and the session alone.
        """
        if isinstance(self._ready, Failure):
            return fail(self._ready)
        if self._ready:
            return succeed(None)
        waiter = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        return waiter

    # Data from the engine

    def _on_data(self, packets: bytes) -> None:
        now = self.clock.seconds()
        self.last_data_at = now
        self._pending += 1
        if self._pending > MAX_PENDING_APPENDS:
            self._reader.pause()
        # Framed once, here; the store and the fan-out share these bytes.
        framed, start = frame(packets)
        d = self.store.buffer.append(self.key, memoryview(framed)[start:-2])
        d.addCallback(self._appended, framed, start, now)
        d.addErrback(self._append_failed)

    def _appended(self, index: int, framed: bytes, start: int, now: float) -> None:
        self._pending -= 1
        if self._pending <= MAX_PENDING_APPENDS // 2 and self._reader is not None:
            self._reader.resume()
        self.follower.publish(Chunk(index, framed, start, now))
        if self._first_data is not None:
            first, self._first_data = self._first_data, None
            first.callback(None)

    def _append_failed(self, failure: Failure) -> None:
        self._pending -= 1
        self.log.failure("stream {key}: could not store a chunk", failure, key=self.key)

    def _on_end(self, reason: Failure | None) -> None:
        self.log.warn(
            "stream {key}: engine {engine} ended playback ({why})",
            key=self.key,
            engine=self.engine.id,
            why="end of body" if reason is None else reason.getErrorMessage(),
        )
        self._reader = None
        if self._first_data is not None:
            first, self._first_data = self._first_data, None
            first.errback(EngineError(f"engine {self.engine.id} ended playback before any data"))
            return
        self.stop("engine ended playback")

    # Players

    def add_player(self, client: ClientInfo, request) -> ClientProducer:
        """
        Attach a player and start streaming to it.
        """
        producer = ClientProducer(client, self.follower, request, self._player_left)
        self.players.add(producer)
        if self._cleanup_call is not None:
            self._cleanup_call.cancel()
            self._cleanup_call = None
            self.store.set_last_disconnect(self.key, None)
        self.store.add_client(
            self.key,
            client.id,
            {
                ClientField.ID: client.id,
                ClientField.WORKER: self.worker_id,
                ClientField.ADDRESS: client.address,
                ClientField.USER_AGENT: client.user_agent,
                ClientField.CONNECTED_AT: client.connected_at,
                ClientField.LAST_HEARTBEAT: client.connected_at,
                ClientField.BYTES_SENT: 0,
                ClientField.SKIPS: 0,
            },
        )
        self.log.info(
            "client {client} ({address}) joined stream {key}",
            client=client.id,
            address=client.address,
            key=self.key,
        )
        producer.start()
        return producer

    def player(self, client_id: str) -> ClientProducer | None:
        for producer in self.players:
            if producer.client.id == client_id:
                return producer
        return None

    def _player_left(self, producer: ClientProducer) -> None:
        self.players.discard(producer)
        self.store.remove_client(self.key, producer.client.id)
        self.log.info(
            "client {client} left stream {key} after {bytes} bytes",
            client=producer.client.id,
            key=self.key,
            bytes=producer.bytes_sent,
        )
        if not self.players:
            self._player_gone()

    def _player_gone(self) -> None:
        """
        The last player left: stop after the grace unless one comes back.
        """
        if self.state is not StreamState.STARTED or self._cleanup_call is not None:
            return
        now = self.clock.seconds()
        self.store.set_last_disconnect(self.key, now)
        self._cleanup_call = self.clock.callLater(self.tuning.cleanup_grace, self._grace_over)

    def _grace_over(self) -> None:
        self._cleanup_call = None
        if not self.players:
            self.stop("no players")

    # Stopping

    def stop(self, why: str) -> Deferred:
        """
        End the stream: players get a clean end of body, the engine is told
        to stop, and every key of the stream is deleted.  Idempotent; fires
        when all that is done.
        """
        if self._stopped is None:
            self._stopped = Deferred()
            self.on_stopping(self, self._stopped)
            Deferred.fromCoroutine(self._stop(why)).chainDeferred(self._stopped)
        return self._stopped

    async def _stop(self, why: str) -> None:
        was_started = self.state is not StreamState.STARTING
        self.state = StreamState.STOPPING
        self.log.info("stream {key} stopping: {why}", key=self.key, why=why)
        if self._cleanup_call is not None:
            self._cleanup_call.cancel()
            self._cleanup_call = None
        if self._starting is not None:
            self._starting.cancel()
        if not self._ready:
            self._set_ready(Failure(EngineError(f"stream {self.key} stopped: {why}")))
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        for producer in list(self.players):
            producer.finish()
        self.follower.window.clear()
        try:
            await self.store.delete_stream(self.key)
        except Exception:
            self.log.failure("stream {key}: could not delete its keys", key=self.key)
        if self.playback is not None:
            try:
                await self.api.stop(self.engine, self.playback)
            except ProxyError as e:
                self.log.warn(
                    "stream {key}: engine {engine} did not confirm stop: {why}",
                    key=self.key,
                    engine=self.engine.id,
                    why=e.message,
                )
        self.log.info("stream {key} stopped", key=self.key, started=was_started)

    # Inspection

    def metadata(self) -> dict:
        """
        The stream's metadata as the store keeps it.
        """
        fields = {
            Meta.KEY: self.key,
            Meta.STATE: self.state.value,
            Meta.PARAM: self.param,
            Meta.ENGINE_ID: self.engine.id,
            Meta.ENGINE_URL: self.engine.url,
            Meta.OWNER: self.worker_id,
            Meta.STARTED_AT: self.started_at,
            Meta.BYTES_IN: self.bytes_in,
            Meta.RECONNECTS: self.reconnects,
            Meta.HEALTH: "healthy",
        }
        if self.last_data_at is not None:
            fields[Meta.LAST_DATA_AT] = self.last_data_at
        if self.playback is not None:
            fields.update(
                {
                    Meta.PLAYBACK_URL: self.playback.playback_url,
                    Meta.STAT_URL: self.playback.stat_url,
                    Meta.COMMAND_URL: self.playback.command_url,
                    Meta.PLAYBACK_SESSION_ID: self.playback.playback_session_id,
                    Meta.IS_LIVE: self.playback.is_live,
                }
            )
        return {str(k): v for k, v in fields.items()}
