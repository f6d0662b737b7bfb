"""
The engines the proxy may use, their health, and the choice of an engine for
a new stream: fewest active streams first, a forwarded engine wins a tie, an
engine that fails its health probe is skipped.
"""

from collections.abc import Collection, Iterable, Mapping

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .config import EngineConfig


@attrs.define(eq=False)
class Engine:
    """
    One configured engine and what the proxy knows of its health.
    """

    id: str
    url: str
    host: str
    port: int
    forwarded: bool = False
    healthy: bool = True
    version: str | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        return cls(config.id, config.url, config.host, config.port, config.forwarded)

    def describe(self, streams: int) -> dict:
        return {
            "id": self.id,
            "url": self.url,
            "forwarded": self.forwarded,
            "healthy": self.healthy,
            "version": self.version,
            "streams": streams,
        }


def select_engine(
    engines: Iterable[Engine], loads: Mapping[str, int], exclude: Collection[str] = ()
) -> Engine | None:
    """
    The seed's rule: least loaded first; on equal load a forwarded engine
    first; unhealthy engines never.  Among equals, configuration order.
    Engines in C{exclude} (those that just failed a stream) are taken only
    when no other healthy engine is left.
    """
    healthy = [engine for engine in engines if engine.healthy]
    candidates = [engine for engine in healthy if engine.id not in exclude] or healthy
    if not candidates:
        return None
    return min(candidates, key=lambda e: (loads.get(e.id, 0), not e.forwarded))


@attrs.define(eq=False)
class EngineRegistry(Service):
    """
    The configured engines, probed every C{probe_interval} seconds with the
    engine API's C{get_version}.
    """

    log = Logger()

    engines: list[Engine]
    api: object
    clock: object
    probe_interval: float
    _loop: LoopingCall | None = attrs.field(default=None, init=False)

    def by_id(self, engine_id: str) -> Engine | None:
        for engine in self.engines:
            if engine.id == engine_id:
                return engine
        return None

    def select(self, loads: Mapping[str, int], exclude: Collection[str] = ()) -> Engine | None:
        return select_engine(self.engines, loads, exclude)

    def probe(self):
        """
        Probe every engine once; fire when all have answered or failed.
        """
        return DeferredList(
            [Deferred.fromCoroutine(self._probe(engine)) for engine in self.engines],
            consumeErrors=True,
        )

    async def _probe(self, engine: Engine) -> None:
        try:
            engine.version = await self.api.version(engine)
        except Exception as e:
            if engine.healthy:
                self.log.warn(
                    "engine {engine} failed its health probe: {why}", engine=engine.id, why=e
                )
            engine.healthy = False
        else:
            if not engine.healthy:
                self.log.info("engine {engine} is healthy again", engine=engine.id)
            engine.healthy = True

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.probe)
        self._loop.clock = self.clock
        self._loop.start(self.probe_interval, now=True).addErrback(
            lambda f: self.log.failure("engine probes stopped", f)
        )

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
