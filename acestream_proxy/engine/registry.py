"""
The engines the proxy may use, their health, and the choice of an engine for
a new stream: fewest active streams first, a forwarded engine wins a tie, an
engine that fails its health probe is skipped.
"""

from collections.abc import Collection, Iterable, Mapping

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from ..config import EngineConfig


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
class EngineRegistry:
    """
    The configured engines, probed with the engine API's C{get_version}:
    L{probe} runs every C{probe_interval} seconds, from a L{TimerService} of
    the proxy's (see L{acestream_proxy.server.StreamRegistry}).
    """

    log = Logger()

    engines: list[Engine]
    api: object

    def by_id(self, engine_id: str) -> Engine | None:
        for engine in self.engines:
            if engine.id == engine_id:
                return engine
        return None

    def select(self, loads: Mapping[str, int], exclude: Collection[str] = ()) -> Engine | None:
        return select_engine(self.engines, loads, exclude)

    def add(self, engine: Engine) -> None:
        """
        Take a new engine (one an orchestrator announced) after the others,
        so that among equals the configured engines still come first.
        """
        self.engines.append(engine)

    def remove(self, engine_id: str) -> Engine | None:
        """
        Forget an engine, so that it gets no new stream; it is marked
        unhealthy too, so that a stream reconnecting from it goes elsewhere.
        """
        engine = self.by_id(engine_id)
        if engine is not None:
            self.engines.remove(engine)
            engine.healthy = False
        return engine

    def probe_one(self, engine: Engine) -> Deferred:
        """
        Probe one engine now: a new one is used once it passes.
        """
        return Deferred.fromCoroutine(self._probe(engine))

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
