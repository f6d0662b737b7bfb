"""
The engines the proxy may use, their health, and the choice of an engine for
a new stream: fewest active streams first, a forwarded engine wins a tie, an
engine that has not passed its health probe is skipped.

A configured engine counts as healthy only once a probe has passed: a daemon
started before its engine (the usual order under Compose) must not claim
engines it has never reached.  When none is healthy, a player's request
probes at once (L{EngineRegistry.probe_unhealthy}) rather than waiting for
the next periodic probe, one probe in flight per engine however many players
ask.
"""

from collections.abc import Collection, Iterable, Mapping

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger

from ..config import EngineConfig
from ..errors import ProxyError


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
    #: Whether it may take new streams.  A configured engine starts
    #: unhealthy (L{from_config}) until its first probe passes.
    healthy: bool = True
    version: str | None = None
    #: Why the last probe failed (one line), L{None} after a pass.
    problem: str | None = None
    #: Whether any probe has ended yet: the first result is always logged.
    probed: bool = False

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        """
        A configured engine, unhealthy until its first probe passes.
        """
        return cls(config.id, config.url, config.host, config.port, config.forwarded, healthy=False)

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
    #: The probe in flight per engine id, shared by whoever asks meanwhile.
    _probing: dict = attrs.field(factory=dict, init=False)

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
        return self._probe_once(engine)

    def healthy(self) -> list[Engine]:
        return [engine for engine in self.engines if engine.healthy]

    def problems(self) -> str:
        """
        One line naming every engine and why it is not healthy, for a
        player's 503 and C{/health}: which engines were tried, and what
        each answered.
        """
        return "; ".join(
            engine.problem or f"engine {engine.id} has not been probed yet"
            for engine in self.engines
            if not engine.healthy
        )

    def probe(self) -> Deferred:
        """
        Probe every engine once; fire when all have answered or failed.
        """
        return self._probe_each(self.engines)

    def probe_unhealthy(self) -> Deferred:
        """
        Probe now every engine that is not healthy, joining a probe already
        in flight rather than starting a second one; fire when all have
        answered or failed.
        """
        return self._probe_each([engine for engine in self.engines if not engine.healthy])

    def _probe_each(self, engines: list[Engine]) -> Deferred:
        return DeferredList([self._probe_once(engine) for engine in engines], consumeErrors=True)

    def _probe_once(self, engine: Engine) -> Deferred:
        """
        A L{Deferred} of its own for the caller, firing when the engine's
        probe in flight (started now if there is none) has ended.
        Cancelling it cancels the probe once no one else waits for it, so
        that a stopping service leaves no probe behind.
        """
        entry = self._probing.get(engine.id)
        if entry is None:
            probe = Deferred.fromCoroutine(self._probe(engine))
            if probe.called:
                # Ended at once (a refused connection, a fake API).
                return probe.addErrback(lambda _: None)
            waiters: list[Deferred] = []
            entry = self._probing[engine.id] = (probe, waiters)

            def done(_):
                self._probing.pop(engine.id, None)
                for waiter in list(waiters):
                    waiter.callback(None)

            probe.addBoth(done)
        probe, waiters = entry

        def cancel(waiter: Deferred) -> None:
            waiters.remove(waiter)
            if not waiters:
                probe.cancel()

        waiter = Deferred(cancel)
        waiters.append(waiter)
        return waiter

    async def _probe(self, engine: Engine) -> None:
        try:
            engine.version = await self.api.version(engine)
        except CancelledError:
            raise
        except Exception as e:
            if isinstance(e, ProxyError):
                problem = e.message
            else:
                problem = f"engine {engine.id} failed its probe: {e.__class__.__name__}"
            if engine.healthy or not engine.probed:
                self.log.warn(
                    "engine {engine} failed its health probe: {why}", engine=engine.id, why=problem
                )
            engine.healthy = False
            engine.problem = problem
        else:
            if not engine.healthy:
                self.log.info(
                    "engine {engine} is healthy again (version {version})"
                    if engine.probed
                    else "engine {engine} is healthy (version {version})",
                    engine=engine.id,
                    version=engine.version,
                )
            engine.healthy = True
            engine.problem = None
        finally:
            engine.probed = True
