"""
The owner's data source: one playback session on an engine, read with treq
into the store writer.

It opens the session (reusing the one a previous owner left, when it still
plays), judges the engine's silence (unhealthy after C{no_data_timeout},
reconnected C{reconnect_after} later), and replaces a playback connection
that ends or falls silent: the same engine first, then the next by the
selection rule, backing off between attempts, up to C{max_reconnects}.
"""

import random
from typing import Awaitable, Callable

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..background import Tasks, periodic
from ..config import Tuning
from ..constants import Meta, StreamState
from ..engine.api import EngineAPI, Playback
from ..engine.reader import EngineReader
from ..engine.registry import Engine
from ..errors import EngineError, EngineTimeout, ProxyError
from ..metrics import (
    RECONNECT_ENGINE_ENDED,
    RECONNECT_ENGINE_WITHDRAWN,
    RECONNECT_NO_DATA,
    Metrics,
)
from .fanout import FanOut
from .health import Verdict, check_interval, judge_silence, reconnect_delays
from .watched import watched
from .writer import StoreWriter


@attrs.define(eq=False)
class EngineFeed(MultiService):
    """
    @ivar choose_engine: picks an engine for a new playback session,
        avoiding the ids in its C{exclude}.
    @ivar find_engine: the configured engine with a given id, if any.
    @ivar changed: called when what the stream's metadata shows changed.
    @ivar failed: called with a reason when no engine could play the stream.
    @ivar jitter: draws the jitter of reconnection delays.
    @ivar on_change: told when C{state} or C{playback} is about to change.
    @ivar metrics: the worker's metrics, where reads and reconnections count.
    """

    log = Logger()

    key: str
    param: str
    api: EngineAPI
    clock: object
    tuning: Tuning
    fanout: FanOut
    writer: StoreWriter
    tasks: Tasks
    choose_engine: Callable[..., Awaitable[Engine]]
    find_engine: Callable[[str], Engine | None]
    changed: Callable[[], None]
    failed: Callable[[str], None]
    engine: Engine | None = None
    reconnects: int = 0
    jitter: Callable[[], float] = random.random
    state: StreamState = watched(StreamState.STARTING)
    playback: Playback | None = watched()
    on_change: Callable[[object, str, object], None] | None = None
    metrics: Metrics = attrs.field(factory=Metrics)
    last_data_at: float | None = None
    started_at: float = 0.0
    _reader: EngineReader | None = attrs.field(default=None, init=False)
    _first: Deferred | None = attrs.field(default=None, init=False)
    _reconnecting: Deferred | None = attrs.field(default=None, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.started_at = self.clock.seconds()
        periodic(
            check_interval(self.tuning), self._check_health, self.clock, self.tasks
        ).setServiceParent(self)

    @property
    def bytes_in(self) -> int:
        return self._reader.bytes_in if self._reader is not None else 0

    # Opening

    async def open(self, takeover: dict | None, put_metadata: Callable[[], Awaitable]) -> None:
        """
        Open the playback body, on the session a previous owner left in
        C{takeover} when it still plays, else on a new session of the chosen
        engine; fire once its first data reached the players.
        """
        if takeover:
            # A new owner counts on from the previous owner's reconnections,
            # whether or not its session still plays.
            self.reconnects += int(float(takeover.get(Meta.RECONNECTS) or 0))
        if not (takeover and await self._reuse(takeover)):
            if self.engine is None:
                self.engine = await self.choose_engine()
            await put_metadata()
            self.playback = await self.api.getstream(self.engine, self.key, self.param)
            await put_metadata()
            self._read(await self.api.open_playback(self.engine, self.playback))
        await self._first_data()
        self.state = StreamState.STARTED

    async def _reuse(self, meta: dict) -> bool:
        engine = self.find_engine(meta.get(Meta.ENGINE_ID, ""))
        try:
            playback = Playback(
                playback_url=meta[Meta.PLAYBACK_URL],
                stat_url=meta[Meta.STAT_URL],
                command_url=meta[Meta.COMMAND_URL],
                playback_session_id=meta.get(Meta.PLAYBACK_SESSION_ID, ""),
                is_live=int(meta.get(Meta.IS_LIVE) or 1),
            )
        except (KeyError, ValueError):
            return False
        if engine is None or not engine.healthy:
            return False
        try:
            response = await self.api.open_playback(engine, playback)
        except ProxyError as e:
            self.log.info(
                "stream {key}: the previous engine session no longer plays ({why})",
                key=self.key,
                why=e.message,
            )
            return False
        self.engine, self.playback = engine, playback
        self._read(response)
        return True

    def _read(self, response) -> None:
        self.writer.new_session()
        # Before the body is delivered: its first bytes may come at once.
        self._first = self.fanout.next_chunk()
        self._reader = EngineReader(
            self._on_data,
            self._on_end,
            key=self.key,
            engine=self.engine.id,
            received=self.metrics.received_bytes,
        )
        self.writer.registerProducer(self._reader, True)
        response.deliverBody(self._reader)

    async def _first_data(self) -> None:
        try:
            await self._first.addTimeout(self.tuning.first_byte_timeout, self.clock)
        except TimeoutError:
            raise EngineTimeout(f"engine {self.engine.id} sent no data in time")
        finally:
            self._first = None

    # Data

    def _on_data(self, packets: bytes) -> None:
        self.last_data_at = self.clock.seconds()
        if self.state is StreamState.UNHEALTHY:
            self.state = StreamState.STARTED
            self.log.info("stream {key} is healthy again", key=self.key)
            self.changed()
        self.writer.write(packets)

    def _on_end(self, reason: Failure | None) -> None:
        self.log.warn(
            "stream {key}: engine {engine} ended playback ({why})",
            key=self.key,
            engine=self.engine.id,
            why="end of body" if reason is None else reason.getErrorMessage(),
        )
        self._drop_reader()
        if self._first is not None:
            self._first.errback(
                EngineError(f"engine {self.engine.id} ended playback before any data")
            )
            return
        self._reconnect("the engine ended playback", RECONNECT_ENGINE_ENDED)

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.stopProducing()
            self._reader = None
        self.writer.unregisterProducer()
        self.writer.end_session()

    # Health and reconnection

    def _check_health(self) -> None:
        if self.state not in (StreamState.STARTED, StreamState.UNHEALTHY) or self._stopped:
            return
        silent = self.clock.seconds() - (self.last_data_at or self.started_at)
        verdict = judge_silence(silent, self.tuning)
        if verdict is Verdict.RECONNECT:
            self._reconnect(f"no data for {silent:.0f}s", RECONNECT_NO_DATA)
        elif verdict is Verdict.UNHEALTHY and self.state is StreamState.STARTED:
            self.state = StreamState.UNHEALTHY
            self.log.warn(
                "stream {key} is unhealthy: no data from engine {engine} for {silent:.0f}s",
                key=self.key,
                engine=self.engine.id,
                silent=silent,
            )
            self.changed()

    def fail_over(self, why: str) -> bool:
        """
        Move a playing stream off its engine (one that was withdrawn), as a
        reconnection does, and say whether it did.  A feed still opening is
        left alone: its first session is not abandoned half-made.
        """
        if self.state not in (StreamState.STARTED, StreamState.UNHEALTHY) or self._stopped:
            return False
        self._reconnect(why, RECONNECT_ENGINE_WITHDRAWN)
        return True

    def _reconnect(self, why: str, reason: str) -> None:
        """
        Replace the playback connection, keeping the players'.  C{reason}
        labels it in the worker's metrics.
        """
        if self._reconnecting is not None or self._stopped:
            return
        self.metrics.reconnects.labels(reason=reason).inc()
        self.log.warn("stream {key}: reconnecting ({why})", key=self.key, why=why)
        self.state = StreamState.RECONNECTING
        self._drop_reader()
        # A reconnection opens a new engine session; end the old one.
        self.tasks.run(self.stop_engine(), keep=True)
        self._reconnecting = self.tasks.run(self._reconnect_attempts())

    async def _reconnect_attempts(self) -> None:
        delays = reconnect_delays(self.jitter)
        failed: set[str] = set()
        previous = self.engine
        try:
            for attempt in range(self.tuning.max_reconnects):
                if delay := delays(attempt):
                    await deferLater(self.clock, delay, lambda: None)
                self.reconnects += 1
                self.changed()
                engine = None
                try:
                    if attempt == 0 and previous.healthy:
                        engine = previous
                    else:
                        engine = await self.choose_engine(exclude=failed)
                    await self._open_on(engine)
                except ProxyError as e:
                    if self._stopped:
                        # Stopping cancelled the attempt, which the engine API
                        # reports as a failed call: another attempt would
                        # bring the stream's keys back.
                        raise CancelledError() from e
                    if engine is not None:
                        failed.add(engine.id)
                    self.log.warn(
                        "stream {key}: reconnection {n} failed: {why}",
                        key=self.key,
                        n=attempt + 1,
                        why=e.message,
                    )
                    continue
                self._reconnecting = None
                self.state = StreamState.STARTED
                self.changed()
                self.log.info(
                    "stream {key}: reconnected on {engine} ({session})",
                    key=self.key,
                    engine=engine.id,
                    session=self.playback.playback_session_id,
                )
                return
        except CancelledError:
            self._reconnecting = None
            return
        self._reconnecting = None
        self.state = StreamState.ERROR
        self.log.error(
            "stream {key}: giving up after {n} reconnections",
            key=self.key,
            n=self.tuning.max_reconnects,
        )
        self.changed()
        self.failed(f"no engine could play it after {self.tuning.max_reconnects} reconnections")

    async def _open_on(self, engine: Engine) -> None:
        """
        One reconnection attempt: a new session on C{engine}, read until its
        first data; a failed attempt's session is stopped.
        """
        playback = await self.api.getstream(engine, self.key, self.param)
        try:
            response = await self.api.open_playback(engine, playback)
            self.engine, self.playback = engine, playback
            self._read(response)
            await self._first_data()
        except BaseException:
            self._drop_reader()
            self.playback = None
            self.tasks.run(self._stop_session(engine, playback), keep=True)
            raise

    # Stopping

    def stopService(self):
        """
        Stop reading the engine; the engine session itself is left to
        L{stop_engine} or to a new owner.
        """
        self._stopped = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._first is not None:
            self._first.cancel()
        self._drop_reader()
        self.writer.stop()
        return MultiService.stopService(self)

    async def stop_engine(self) -> None:
        """
        End this feed's engine session, if it has one.
        """
        engine, playback, self.playback = self.engine, self.playback, None
        if playback is not None:
            await self._stop_session(engine, playback)

    async def _stop_session(self, engine: Engine, playback: Playback) -> None:
        try:
            await self.api.stop(engine, playback)
        except ProxyError as e:
            self.log.warn(
                "stream {key}: engine {engine} did not confirm stop: {why}",
                key=self.key,
                engine=engine.id,
                why=e.message,
            )
