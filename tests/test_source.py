"""
Tests for C{acesim --source}: a real MPEG-TS file played, looped, as a live
broadcast (L{acestream_proxy.testing.source}).

Pacing and looping are tested on a L{Clock} with a file made here whose
PCRs say its bitrate; the proxy in front of it on real sockets.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import pytest_twisted
import treq
from twisted.internet.protocol import Protocol
from twisted.python import usage

from acestream_proxy.stream.mpegts import PACKET_SIZE
from acestream_proxy.testing import source as source_module
from acestream_proxy.testing import synthetic
from acestream_proxy.testing.engine import content_tag, getstream_path
from acestream_proxy.testing.simulator_service import Options, makeService
from acestream_proxy.testing.source import SourceError, TsSource, load

from .support import HASHES, Player, eventually, start_engine
from .test_simulator import HASH, INTERVAL, OTHER_HASH, REPO, FakeHTTP, local

PCR_PID = 0x101
PAYLOAD_PID = 0x102
#: 2000 packets a second: a batch of 1/16 s is 125 packets.
FILE_PPS = 2000
FILE_BITRATE = FILE_PPS * PACKET_SIZE * 8
PER_BATCH = FILE_PPS // 16


def pcr_packet(index: int, bitrate: int) -> bytes:
    """A packet of PCR_PID whose PCR says packet C{index} is due then."""
    ticks = index * PACKET_SIZE * 8 * source_module.PCR_HZ // bitrate
    base, extension = divmod(ticks, 300)
    pcr = (base << 15) | (0x3F << 9) | extension
    head = bytes([0x47, PCR_PID >> 8, PCR_PID & 0xFF, 0x20 | (index & 0xF), 183, 0x10])
    packet = head + pcr.to_bytes(6, "big")
    return packet + b"\xff" * (PACKET_SIZE - len(packet))


def payload_packet(index: int) -> bytes:
    """A packet of PAYLOAD_PID that says which packet of the file it is."""
    head = bytes([0x47, PAYLOAD_PID >> 8, PAYLOAD_PID & 0xFF, 0x10 | (index & 0xF)])
    return head + index.to_bytes(4, "big") * ((PACKET_SIZE - 4) // 4)


def ts_file(count: int, bitrate: int = FILE_BITRATE, data_every: int = 0) -> bytes:
    """
    C{count} packets muxed at C{bitrate}: a PCR every 10 packets, and a
    synthetic data packet every C{data_every} (0: none), numbered 0 in the
    file (the engine numbers them as it serves them).
    """
    packets = []
    for index in range(count):
        if index % 10 == 0:
            packets.append(pcr_packet(index, bitrate))
        elif data_every and index % data_every == 0:
            packets.append(synthetic.data_packet(0, b"\0\0\0\0", 0.0))
        else:
            packets.append(payload_packet(index))
    return b"".join(packets)


def looped(data: bytes, size: int, start_packet: int = 0) -> bytes:
    """C{size} bytes of C{data} looped, from its packet C{start_packet}."""
    start = start_packet * PACKET_SIZE % len(data)
    repeats = (start + size) // len(data) + 1
    return (data * repeats)[start : start + size]


def without_data(data: bytes) -> bytes:
    """C{data} with every synthetic data packet blanked, to compare the rest."""
    out = bytearray(data)
    for offset in range(0, len(out), PACKET_SIZE):
        if synthetic.parse_data_packet(bytes(out[offset : offset + PACKET_SIZE])):
            out[offset : offset + PACKET_SIZE] = b"D" * PACKET_SIZE
    return bytes(out)


@pytest.fixture
def ts_path(tmp_path):
    path = tmp_path / "broadcast.ts"
    path.write_bytes(ts_file(3000) + b"\x47\x00")  # a torn last packet
    return path


class TestLoad:
    def test_reads_whole_packets_and_the_pcr_bitrate(self, ts_path) -> None:
        loaded = load(ts_path)
        assert loaded.data == ts_file(3000)
        assert loaded.packet_count == 3000
        assert abs(loaded.bitrate - FILE_BITRATE) <= 8
        assert loaded.data_positions == ()

    def test_finds_data_packets(self, tmp_path) -> None:
        path = tmp_path / "data.ts"
        path.write_bytes(ts_file(100, data_every=7))
        assert load(path).data_positions == tuple(
            i for i in range(100) if i % 7 == 0 and i % 10 != 0
        )

    def test_no_pcr_means_no_bitrate(self, tmp_path) -> None:
        path = tmp_path / "nopcr.ts"
        path.write_bytes(b"".join(payload_packet(i) for i in range(50)))
        assert load(path).bitrate is None

    @pytest.mark.parametrize(
        "content, message",
        [
            (None, "cannot read"),
            (b"", "not an MPEG-TS file"),
            (b"hello, this is text\n" * 100, "not an MPEG-TS file"),
            (ts_file(10)[:500] + ts_file(10)[501:], "not an MPEG-TS"),  # a byte lost
            (ts_file(100), "larger than"),
        ],
        ids=["missing", "empty", "text", "lost-sync", "too-large"],
    )
    def test_bad_files_are_one_line(self, tmp_path, content, message) -> None:
        path = tmp_path / "bad.ts"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(SourceError) as caught:
            load(path, max_bytes=50 * PACKET_SIZE)
        assert message in str(caught.value)
        assert "\n" not in str(caught.value)

    def test_directory_is_unreadable(self, tmp_path) -> None:
        with pytest.raises(SourceError, match="cannot read"):
            load(tmp_path)


class TestOptions:
    def test_bitrate_comes_from_the_file(self, ts_path) -> None:
        options = Options()
        options.parseOptions(["--source", str(ts_path)])
        assert isinstance(options["source"], TsSource)
        assert abs(options["bitrate"] - FILE_BITRATE) <= 8

    def test_bitrate_flag_wins(self, ts_path) -> None:
        options = Options()
        options.parseOptions(["--source", str(ts_path), "--bitrate", "1000000"])
        assert options["bitrate"] == 1_000_000

    def test_synthetic_default_is_unchanged(self) -> None:
        options = Options()
        options.parseOptions([])
        assert options["source"] is None
        assert options["bitrate"] == 4_000_000

    def test_missing_file_is_a_usage_error(self, tmp_path) -> None:
        with pytest.raises(usage.UsageError, match="cannot read .*nothing.ts"):
            Options().parseOptions(["--source", str(tmp_path / "nothing.ts")])

    def test_file_without_pcr_needs_bitrate(self, tmp_path) -> None:
        path = tmp_path / "nopcr.ts"
        path.write_bytes(b"".join(payload_packet(i) for i in range(50)))
        with pytest.raises(usage.UsageError, match="give --bitrate"):
            Options().parseOptions(["--source", str(path)])
        options = Options()
        options.parseOptions(["--source", str(path), "--bitrate", "500000"])
        assert options["bitrate"] == 500_000


def source_engine(data: bytes) -> FakeHTTP:
    return FakeHTTP.make(
        bitrate=FILE_BITRATE, source=TsSource(data, FILE_BITRATE, source_module.data_positions(data))
    )


class TestClockDriven:
    def test_paced_at_the_bitrate_from_the_files_start(self) -> None:
        data = ts_file(3000)  # 1.5 s of it: 10 s loop it six times
        fake = source_engine(data)
        fake.clock.advance(7.3)  # the broadcast begins at the first playback
        _, playback = fake.play()
        assert playback.take() == data[:PACKET_SIZE]
        fake.tick(16 * 10)
        body = playback.body
        assert len(body) % PACKET_SIZE == 0
        assert len(body) == (10 * FILE_PPS + 1) * PACKET_SIZE
        assert body == looped(data, len(body))
        # The loop restarts at the file's first packet.
        assert body[len(data) : len(data) + PACKET_SIZE] == data[:PACKET_SIZE]

    def test_sessions_of_one_content_share_the_position(self) -> None:
        data = ts_file(3000)
        fake = source_engine(data)
        _, first = fake.play()
        fake.tick(20)
        fake.clock.advance(0.01)
        second = fake.request(local(fake.getstream(HASH, param="id")["playback_url"]))
        joined_at = fake.engine.current_seq(HASH)
        _, other = fake.play(OTHER_HASH)
        fake.tick(40)
        assert first.body == looped(data, len(first.body))
        assert second.body == looped(data, len(second.body), joined_at)
        # The same moment carries the same bytes for both sessions.
        start = joined_at * PACKET_SIZE
        assert first.body[start:] == second.body[: len(first.body) - start]
        # Another content begins its own broadcast at its first playback.
        assert other.body == looped(data, len(other.body))

    def test_data_packets_are_numbered_across_loops(self) -> None:
        data = ts_file(400, data_every=3)
        fake = source_engine(data)
        _, playback = fake.play()
        fake.tick(16 * 3)  # 6000 packets: 15 loops
        report = synthetic.verify(playback.body, content_tag=content_tag(HASH))
        assert report.ok, report.describe()
        per_loop = len(source_module.data_positions(data))
        assert report.first_seq == 0
        assert report.last_seq == report.data_packets - 1 > 14 * per_loop
        # Everything else is the file's bytes, unchanged.
        body = playback.body
        assert without_data(body) == without_data(looped(data, len(body)))

    def test_late_joiner_of_a_data_file_verifies(self) -> None:
        data = ts_file(400, data_every=3)
        fake = source_engine(data)
        _, first = fake.play()
        fake.tick(37)
        fake.clock.advance(INTERVAL / 3)
        second = fake.request(local(fake.getstream(HASH)["playback_url"]))
        fake.tick(30)
        for playback in (first, second):
            report = synthetic.verify(playback.body, content_tag=content_tag(HASH))
            assert report.ok, report.describe()
        assert synthetic.verify(second.body).first_seq > 0


@pytest_twisted.ensureDeferred
async def test_proxy_relays_the_file(proxy_factory, tmp_path) -> None:
    """A proxy in front of a --source engine relays the looped file intact."""
    data = ts_file(1000, bitrate=8_000_000, data_every=5)
    running = start_engine(
        bitrate=8_000_000,
        batch_interval=0.02,
        source=TsSource(data, 8_000_000, source_module.data_positions(data)),
    )
    try:
        proxy = await proxy_factory([running.config("engine-a")])
        player = await Player.open(proxy.stream_url(HASHES[0]))
        assert player.response.code == 200
        await player.wait_bytes(3 * len(data))
        body = bytes(player.data)
        body = body[: len(body) - len(body) % PACKET_SIZE]
        report = synthetic.verify(body, content_tag=content_tag(HASHES[0]))
        assert report.ok, report.describe()
        # A whole-packet slice of the loop, wherever the player joined it.
        position = without_data(data * 5).find(without_data(body[: 2 * len(data)]))
        assert position >= 0 and position % PACKET_SIZE == 0
        player.disconnect()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_acesim_service_plays_the_source(ts_path) -> None:
    """C{twistd acesim --source FILE} serves the file from its start, at its PCR bitrate."""
    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--source", str(ts_path)])
    service = makeService(options)
    service.startService()
    try:
        (port,) = service.endpoint.ports
        url = f"http://127.0.0.1:{port.getHost().port}"
        response = await treq.get(url + getstream_path(HASH))
        playback_url = (await response.json())["response"]["playback_url"]
        playback = await treq.get(playback_url, unbuffered=True, persistent=False)
        assert playback.code == 200
        received = bytearray()
        playback.deliverBody(_Collect(received))
        data = ts_file(3000)
        # 2000 packets a second: a fifth of a second of it.
        await eventually(lambda: len(received) >= 400 * PACKET_SIZE, what="400 packets")
        assert bytes(received[: 400 * PACKET_SIZE]) == data[: 400 * PACKET_SIZE]
    finally:
        await service.stopService()


class _Collect(Protocol):
    def __init__(self, into: bytearray) -> None:
        self.into = into

    def dataReceived(self, data: bytes) -> None:
        self.into += data


def test_the_simulator_and_demo_do_not_import_pyav() -> None:
    """PyAV is an extra: running the simulator or the demo must not need it."""
    code = (
        "import sys, twisted.plugins.acesim, acestream_proxy.testing.simulator_service, "
        "acestream_proxy.testing.demo; "
        "sys.exit(1 if 'av' in sys.modules else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr or "av was imported"
