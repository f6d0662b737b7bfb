"""
The service tree twistd runs: the store (its Redis connections, if any), the
HTTP client's connection pool, the HTTP listener and the proxy (its streams,
engine probes and client heartbeats), each undone by its own C{stopService}.
"""

import ipaddress
import re
import resource
import uuid

from twisted.application.service import MultiService, Service
from twisted.internet.defer import succeed
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from .config import Config, Tuning
from .engine.api import EngineAPI, EngineClient
from .engine.registry import Engine, EngineRegistry
from .http.listening import listening_service
from .http.routes import make_site
from .metrics import Metrics
from .store.memory import MemoryStore
from .stream.registry import StreamRegistry

__all__ = ["make_service", "make_store"]

log = Logger()

#: Descriptors besides one per player and two per stream (its engine
#: playback and API connections): the listener, Redis, the log, API callers.
FILE_MARGIN = 64


class _OrderedService(MultiService):
    """
    A L{MultiService} that stops its children one after another, the last
    added first, each once the one before it has finished stopping: the
    streams wind down (players get their last bytes, engines their stop
    command) while the listener still answers and the HTTP client still
    has its pool.
    """

    def stopService(self):
        Service.stopService(self)
        d = succeed(None)
        for service in reversed(list(self)):
            d.addBoth(lambda _, service=service: service.stopService())
        return d


class _ConnectionPool(Service):
    """
    Closes the HTTP client's cached engine connections at shutdown.
    """

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """
    The engine client's pool, whose connections do not log C{Starting
    factory} and C{Stopping factory}: a probe or an API call that opens a
    connection would otherwise log two lines an operator has no use for.
    """

    _factory = _QuietClientFactory


def make_store(config: Config, reactor, worker_id: str, metrics: Metrics | None = None):
    """
    The embedded store, or the Redis store when C{redis} is configured,
    counting its failed operations in C{metrics}.
    The Redis store (txredisapi and, through it, Twisted's TLS module) is
    imported only then.
    """
    tuning = config.tuning
    if config.redis is None:
        return MemoryStore(
            reactor,
            tuning.buffer_chunks,
            tuning.chunk_ttl,
            worker_id,
            buffer_bytes=tuning.buffer_bytes,
            buffer_seconds=tuning.buffer_seconds,
        )
    from .store.redis import RedisStore

    return RedisStore(
        url=config.redis,
        reactor=reactor,
        worker_id=worker_id,
        buffer_chunks=tuning.buffer_chunks,
        chunk_ttl=tuning.chunk_ttl,
        ghost_client_timeout=tuning.ghost_client_timeout,
        owner_lease=tuning.owner_lease,
        worker_timeout=tuning.worker_timeout,
        metrics=metrics if metrics is not None else Metrics(),
    )


def make_service(config: Config, reactor=None, listen: bool = True) -> MultiService:
    """
    Build the whole daemon from C{config}.  The listener is added first so
    that it stops last: while streams wind down, new requests still get an
    answer (503) instead of a refused connection.

    Its children are named: C{store}, C{engine-pool}, C{http} (the
    listener; absent with C{listen=False}, for a caller that listens on
    L{make_site} itself), C{streams} (the L{StreamRegistry}) and, with
    C{engines_url}, C{orchestrator} (the poller of its engine list) and,
    with C{engines_events}, C{orchestrator-events}.
    """
    if reactor is None:
        from twisted.internet import reactor
    tuning = config.tuning
    raise_file_limit(tuning)
    top = _OrderedService()

    worker_id = uuid.uuid4().hex[:12]
    # The daemon's one registry of metrics, handed to whatever counts.
    metrics = Metrics()
    store = make_store(config, reactor, worker_id, metrics)
    if isinstance(store, Service):
        _named(store, "store", top)
    pool = QuietConnectionPool(reactor)
    _named(_ConnectionPool(pool), "engine-pool", top)
    # An EngineClient follows no redirect: engines are reached at their
    # configured address only.
    http = EngineClient(Agent(reactor, connectTimeout=tuning.engine_connect_timeout, pool=pool))
    api = EngineAPI(
        http, reactor, tuning.engine_timeout, tuning.first_byte_timeout, metrics=metrics
    )
    engines = EngineRegistry([Engine.from_config(engine) for engine in config.engines], api)
    streams = StreamRegistry(store, engines, api, reactor, tuning, worker_id, metrics=metrics)
    if listen:
        warn_if_loopback_is_admin(config)
        site = make_site(streams, config)
        listener = listening_service(reactor, config.listen, site, config.reuse_port)
        _named(listener, "http", top)
    _named(streams, "streams", top)
    if config.engines_url is not None:
        # Added last, so stopped first: no engine is withdrawn, nor stream
        # failed over, while the streams wind down.
        from .engine.orchestrator import Orchestrator

        orchestrator = Orchestrator(
            url=config.engines_url,
            http=http,
            clock=reactor,
            registry=engines,
            streams=lambda: list(streams.streams.values()),
            refresh_interval=tuning.engines_refresh,
            timeout=tuning.engine_timeout,
            api_key=config.engines_api_key,
        )
        _named(orchestrator, "orchestrator", top)
        if config.engines_events:
            from .engine.orchestrator import EventReporter

            events = EventReporter(
                engines_url=config.engines_url,
                http=http,
                clock=reactor,
                streams=lambda: list(streams.streams.values()),
                api_key=config.engines_api_key,
            )
            _named(events, "orchestrator-events", top)
    return top


def warn_if_loopback_is_admin(config: Config) -> None:
    """
    Without an admin token, whoever connects from loopback is an admin.  A
    daemon that listens on loopback only is usually behind a reverse proxy
    on the same host, whose every request comes from loopback: say so.
    """
    interface = _LISTEN_INTERFACE.search(config.listen)
    if config.admin_token or interface is None:
        return
    try:
        loopback = ipaddress.ip_address(interface.group(1).replace("\\", "")).is_loopback
    except ValueError:
        loopback = interface.group(1) == "localhost"
    if loopback:
        log.warn(
            "listening on loopback ({listen}) without admin_token: every local client,"
            " a reverse proxy on this host included, may stop streams and see players'"
            " details; set admin_token",
            listen=config.listen,
        )


#: The interface of a strports description, as in C{tcp:8000:interface=::1}.
_LISTEN_INTERFACE = re.compile(r"(?:^|:)interface=((?:[^:\\]|\\.)+)")


def file_limit_needed(tuning: Tuning) -> int:
    """
    Descriptors the daemon may need at its limits: one per player, two per
    stream, and L{FILE_MARGIN}.
    """
    return tuning.max_clients + 2 * tuning.max_streams + FILE_MARGIN


def raise_file_limit(tuning: Tuning) -> None:
    """
    Raise this process's soft limit on open files to what C{max_clients}
    needs, as far as the hard limit allows, and say in one line what was
    done or why it falls short.  At the usual soft limit of 1024, the
    daemon would otherwise fail to accept players (EMFILE) far below
    C{max_clients}.
    """
    needed = file_limit_needed(tuning)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as e:
        log.warn("cannot read the open-file limit: {error}", error=e)
        return
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.warn(
            "the open-file limit is {soft}, below the {needed} that max_clients={clients}"
            " needs, and raising it failed: {error}",
            soft=soft,
            needed=needed,
            clients=tuning.max_clients,
            error=e,
        )
        return
    if target >= needed:
        log.info(
            "raised the open-file limit from {soft} to {needed} for max_clients={clients}",
            soft=soft,
            needed=needed,
            clients=tuning.max_clients,
        )
    else:
        log.warn(
            "the open-file limit is {target} (the hard limit), below the {needed} that"
            " max_clients={clients} needs: raise LimitNOFILE, or lower max_clients",
            target=target,
            needed=needed,
            clients=tuning.max_clients,
        )


def _named(service: Service, name: str, parent: MultiService) -> None:
    service.setName(name)
    service.setServiceParent(parent)
