"""
The fan-out benchmark's own parts: the checking client, the table and the
memory slope, and the relay that is the table's floor.
"""

import random
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.testing import StringTransport

from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing import synthetic
from acestream_proxy.testing.engine import content_tag
from bench import players, relay, table

from .support import Player as Reader
from .support import start_engine

KEY = "5e" * 20
TAG = content_tag(KEY)
HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: video/mp2t\r\n\r\n"


def batches(count: int = 12, per_batch: int = 30, drop: int | None = None) -> list[bytes]:
    """Batches as the simulated engine writes them; C{drop} leaves out that data packet."""
    out = []
    for n in range(count):
        data = synthetic.data_packets(1000 + n * per_batch, per_batch, TAG, time.time())
        if drop is not None and n * per_batch <= drop - 1000 < (n + 1) * per_batch:
            at = (drop - 1000 - n * per_batch) * PACKET_SIZE
            data = data[:at] + data[at + PACKET_SIZE :]
        out.append(synthetic.pat_packet(n) + synthetic.pmt_packet(n) + data)
    return out


def read(body: bytes, skip: int = 0) -> tuple[players.Player, players.Client]:
    """
    A player that gets C{body} as chunks (less its first C{skip} bytes, as
    from a relay joining mid-packet), in reads of random sizes.
    """
    client = players.Client({"key": KEY, "stride": 1, "players": []})
    client.measuring = True
    player = players.Player(client, 0)
    player.makeConnection(StringTransport())
    body = body[skip:]
    framed = HEAD
    cut = random.Random(7)
    at = 0
    while at < len(body):
        size = cut.randint(1, 9000)
        framed += b"%x\r\n%s\r\n" % (min(size, len(body) - at), body[at : at + size])
        at += size
    framed += b"0\r\n\r\n"
    at = 0
    while at < len(framed):
        size = cut.choice([1, 2, 5, 188, 1500, 20000])
        player.dataReceived(framed[at : at + size])
        at += size
    return player, client


def test_player_checks_every_packet_in_order():
    body = b"".join(batches())
    player, client = read(body)
    assert player.problem is None
    assert not player.misaligned
    assert player.expect == 1000 + 12 * 30
    assert player.bytes == len(body)
    assert player.ended
    assert client.latencies and all(0 <= x < 5 for x in client.latencies)


def test_player_sees_a_missing_packet():
    player, _ = read(b"".join(batches(drop=1100)))
    assert player.problem is not None


def test_player_resynchronises_a_start_mid_packet():
    player, _ = read(b"".join(batches()), skip=100)
    assert player.problem is None
    assert player.misaligned
    assert player.expect == 1000 + 12 * 30


def result(target: str, players_: int, **figures) -> dict:
    base = {
        "target": target, "players": players_, "cpu_per_player_minute": 0.0155, "peak_rss_mb": 70.8,
        "peak_rss_sum_mb": 70.8, "processes": 1, "latency_p50": 0.012, "latency_p99": 0.026,
        "first_byte_p50_ms": 1.3, "gap_free": players_, "engine_sessions": 1,
    }
    return {**base, **figures}


EXPECTED_TABLE = """\
==============  =======  ================  ============  =================  =================  =========  ===============
target          players  CPU-s/player-min   peak RSS MB  latency p50/p99 s  first byte p50 ms   gap-free  engine sessions
==============  =======  ================  ============  =================  =================  =========  ===============
aceproxy              1            0.0155          50.0      0.012 / 0.026               5.6*        1/1                1
aceproxy-redis        1            0.0155  60.0 (119.5)      0.012 / 0.026               1.3*        1/1                1
aceproxy            300            0.0155          55.0      0.012 / 0.026                1.3    299/300                1
aceproxy-redis      300  failed: RuntimeError: nothing answered
aceproxy           1000            0.0155          66.0              - / -                1.3  1000/1000                1
==============  =======  ================  ============  =================  =================  =========  ==============="""


def test_table_and_slopes():
    results = [
        result("aceproxy", 1, peak_rss_mb=50.0, peak_rss_sum_mb=50.0, first_byte_p50_ms=5.6),
        result("aceproxy-redis", 1, peak_rss_mb=60.0, peak_rss_sum_mb=119.5, processes=2),
        result("aceproxy", 300, peak_rss_mb=55.0, peak_rss_sum_mb=55.0, gap_free=299),
        result("aceproxy-redis", 300, error="RuntimeError: nothing answered"),
        result("aceproxy", 1000, peak_rss_mb=66.0, peak_rss_sum_mb=66.0, latency_p50=None, latency_p99=None),
    ]
    assert table.format_table(results) == EXPECTED_TABLE
    assert table.slopes(results) == [
        "Memory per player, (peak RSS at high - at low) / (high - low), RSS summed over processes:",
        "  aceproxy: 16.4 KB/player (1 -> 1000), 16.1 KB/player (300 -> 1000)",
    ]
    assert table.slopes(results[:2]) == []


@pytest_twisted.ensureDeferred
async def test_relay_passes_the_engine_packets_in_order():
    engine = start_engine(bitrate=4_000_000)
    factory = relay.Relay(engine.url)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/ace/getstream?id={KEY}"
    try:
        first = await Reader.open(url)
        await first.wait_bytes(60_000)
        second = await Reader.open(url)
        await second.wait_bytes(60_000)
        reports = []
        for reader in (first, second):
            data = bytes(reader.data)
            start = players.Player._sync(data)
            whole = start + (len(data) - start) // PACKET_SIZE * PACKET_SIZE
            reports.append(synthetic.verify(data[start:whole], content_tag=TAG))
            assert reports[-1].ok, reports[-1].describe()
            reader.disconnect()
        assert reports[1].first_seq > reports[0].first_seq
        assert len(engine.engine.getstream_calls) == 1
    finally:
        streams = list(factory.streams.values())
        await port.stopListening()
        await engine.stop()
        for stream in streams:
            await stream.done
