"""
Fixtures shared by the socket-level tests: a simulated engine, a factory
of proxies and real Redis servers, each stopped after its test; and what
libav says while a test decodes.
"""

import shutil

import av.logging
import pytest
import pytest_twisted

from .redis_server import RedisServer
from .support import start_engine, start_proxy

# 8 Mbit/s in 50 ms batches: about 50 KB per batch.
BITRATE = 8_000_000


@pytest.fixture
def decoder_log():
    """
    Every message libav logs at warning level or worse while decoding: a
    decoder reports damage it concealed here, without raising.
    """
    previous = av.logging.get_level()
    skip_repeated = av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.WARNING)
    # Each message as it comes, not a repeat held back to be summed with
    # the next message, which could fall in another test's capture.
    av.logging.set_skip_repeated(False)
    with av.logging.Capture() as logs:
        yield logs
    av.logging.set_level(previous)
    av.logging.set_skip_repeated(skip_repeated)


@pytest.fixture
def engine():
    running = start_engine(bitrate=BITRATE)
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def proxy_factory():
    started = []

    async def start(engines, **options):
        proxy = await start_proxy(engines, **options)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        pytest_twisted.blockon(proxy.stop())


@pytest.fixture
def redis_server():
    """
    A fresh redis-server of this test's own, so that no key of one test can
    be seen by another.
    """
    server = RedisServer().start()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(params=["memory", "redis"], ids=["memory", "redis"])
def store_url(request):
    """
    The C{redis} setting a test runs with: L{None} for the embedded store,
    or the URL of a fresh Redis, so that one test checks both stores.
    """
    if request.param == "memory":
        yield None
    else:
        yield request.getfixturevalue("redis_server").url
