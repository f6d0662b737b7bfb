"""
A player that stops reading must neither stall the others nor make the proxy
hold more than its window; when it reads again it resumes on a packet
boundary at the live edge.
"""

import pytest_twisted

from acestream_proxy.testing.engine import content_tag
from acestream_proxy.testing.synthetic import verify

from .rawplayer import open_raw_player
from .support import HASHES, Player, eventually, start_engine, start_proxy

KEY = HASHES[1]


@pytest_twisted.ensureDeferred
async def test_paused_player_neither_stalls_others_nor_grows_memory():
    # 16 Mbit/s in 50 ms batches: 100 KB a chunk; the window holds 1 s.
    engine = start_engine(bitrate=16_000_000)
    proxy = await start_proxy([engine.config("engine-a")], buffer_chunks=20, join_chunks=2)
    try:
        fast = await Player.open(proxy.stream_url(KEY))
        await fast.wait_bytes(1)
        slow = open_raw_player(proxy.port.getHost().port, f"/ace/getstream?id={KEY}")
        await eventually(lambda: slow.head is not None, what="slow player's headers")
        assert slow.head.startswith(b"HTTP/1.1 200")
        slow.pause()

        session = proxy.registry.streams[KEY]
        slow_producer = max(session.players, key=lambda p: p.info.connected_at)
        assert slow_producer.info.user_agent == "raw"
        # Once the kernel's buffers are full the slow player's producer stays
        # paused while the window moves on past its position; the window
        # keeps its size and the fast player keeps getting every packet.
        window = session.fanout.window
        await eventually(
            lambda: slow_producer.paused and window.first_index > slow_producer.position + 5,
            what="slow player left behind by the window",
        )
        assert len(window) <= 20
        before = len(fast.data)
        await fast.more(1_000_000)
        report = verify(bytes(fast.data), content_tag=content_tag(KEY))
        assert report.ok, report.describe()
        assert len(fast.data) > before

        slow.resume()
        await eventually(lambda: slow_producer.skips == 1, what="slow player skipped to live")
        # What the kernel buffered before the skip arrives first, then the
        # live edge.  A player this slow (a 4 KB receive window) may fall
        # behind again: every jump in its sequence is a counted skip, and its
        # bytes stay whole packets with no duplicate.
        def back_at_live():
            report = verify(slow.body(), allowed_jumps=slow_producer.skips, content_tag=content_tag(KEY))
            return report if report.gaps and report.last_seq > report.gaps[-1][1] + 1000 else None

        slow_report = await eventually(back_at_live, what="slow player streams from live")
        assert slow_report.ok, slow_report.describe()
        assert 1 <= len(slow_report.gaps) <= slow_producer.skips
        fast.disconnect()
        slow.transport.loseConnection()
    finally:
        await proxy.stop()
        await engine.stop()
