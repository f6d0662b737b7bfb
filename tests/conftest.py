"""
Fixtures shared by the socket-level tests: a simulated engine and a factory
of proxies, each stopped after its test.
"""

import pytest
import pytest_twisted

from .support import start_engine, start_proxy

# 8 Mbit/s in 50 ms batches: about 50 KB per batch.
BITRATE = 8_000_000


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
