"""Tests for L{acestream_proxy.stream.mpegts} and L{acestream_proxy.testing.synthetic}."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from acestream_proxy.stream.mpegts import (
    PACKET_SIZE,
    PAT_PID,
    SYNC_BYTE,
    PacketAligner,
    mpeg2_crc32,
)
from acestream_proxy.testing import synthetic
from acestream_proxy.testing.synthetic import (
    DATA_PID,
    PMT_PID,
    data_packet,
    data_packets,
    parse_data_packet,
    pat_packet,
    pmt_packet,
    verify,
)

TAG = b"\xab\xcd\x01\x02"
OTHER_TAG = b"\x99\x98\x97\x96"


def stream(first_seq: int = 0, batches: int = 4, per_batch: int = 5) -> bytes:
    """A stream shaped like the simulated engine's: PAT, PMT, data, repeat."""
    parts = []
    for batch in range(batches):
        parts.append(pat_packet(batch) + pmt_packet(batch))
        parts.append(
            data_packets(first_seq + batch * per_batch, per_batch, TAG, 1000.0 + batch)
        )
    return b"".join(parts)


def pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


def section(packet: bytes) -> bytes:
    """The PSI section (with its CRC) in a packet whose pointer_field is 0."""
    assert packet[4] == 0, "pointer_field"
    length = ((packet[6] & 0x0F) << 8) | packet[7]
    return packet[5 : 8 + length]


class TestAligner:
    def test_aligned_input_is_returned_as_is(self) -> None:
        data = stream()
        aligner = PacketAligner()
        assert aligner.feed(data) is data
        assert aligner.feed(b"") == b""
        assert (aligner.resyncs, aligner.discarded) == (0, 0)

    def test_split_at_every_offset_reassembles(self) -> None:
        data = stream(batches=2, per_batch=2)
        for offset in range(len(data) + 1):
            aligner = PacketAligner()
            first = aligner.feed(data[:offset])
            second = aligner.feed(data[offset:])
            assert len(first) == offset // PACKET_SIZE * PACKET_SIZE
            assert first + second == data, offset
            assert (aligner.resyncs, aligner.discarded) == (0, 0)

    def test_output_is_whole_packets_only(self) -> None:
        data = stream(batches=1, per_batch=3)
        aligner = PacketAligner()
        assert aligner.feed(data[:100]) == b""
        out = aligner.feed(data[100:500])
        assert out == data[: 2 * PACKET_SIZE]
        assert aligner.feed(data[500:]) == data[2 * PACKET_SIZE :]

    def test_junk_prefix_is_dropped_and_counted(self) -> None:
        data = stream()
        junk = b"\x00\x01junk\x02"
        aligner = PacketAligner()
        assert aligner.feed(junk + data) == data
        assert (aligner.resyncs, aligner.discarded) == (1, len(junk))

    def test_junk_between_packets_is_dropped(self) -> None:
        data = stream()
        cut = 7 * PACKET_SIZE
        junk = b"\x01\x02\x03" + bytes([SYNC_BYTE]) + b"\x04" * 20
        aligner = PacketAligner()
        out = aligner.feed(data[:cut] + junk + data[cut:])
        assert out == data
        assert (aligner.resyncs, aligner.discarded) == (1, len(junk))
        assert verify(out, content_tag=TAG).ok

    def test_junk_fed_byte_by_byte(self) -> None:
        data = stream()
        cut = 3 * PACKET_SIZE
        junk = b"\x00" * 5 + bytes([SYNC_BYTE]) + b"\x00" * 7
        spoiled = data[:cut] + junk + data[cut:] + junk + data
        aligner = PacketAligner()
        out = b"".join(aligner.feed(spoiled[i : i + 1]) for i in range(len(spoiled)))
        assert out == data + data
        assert (aligner.resyncs, aligner.discarded) == (2, 2 * len(junk))

    def test_candidate_waits_for_confirmation(self) -> None:
        """A 0x47 after junk is not trusted until the next packet confirms it."""
        data = stream(batches=1, per_batch=2)
        aligner = PacketAligner()
        assert aligner.feed(b"junk" + data[:PACKET_SIZE]) == b""
        assert aligner.discarded == 4
        assert aligner.feed(data[PACKET_SIZE:]) == data

    def test_unconfirmed_sync_byte_is_skipped(self) -> None:
        """A lone 0x47 whose +188 is not a sync byte is junk, not a packet."""
        data = stream(batches=1, per_batch=3)
        fake = b"\x00" + bytes([SYNC_BYTE]) + b"\x00" * 200
        aligner = PacketAligner()
        assert aligner.feed(fake + data) == data
        assert (aligner.resyncs, aligner.discarded) == (1, len(fake))

    def test_garbage_without_sync_byte_is_dropped_entirely(self) -> None:
        aligner = PacketAligner()
        assert aligner.feed(b"\x00" * 1000) == b""
        assert aligner.discarded == 1000
        data = stream()
        assert aligner.feed(data) == data
        assert aligner.resyncs == 1

    def test_reset_drops_partial_packet(self) -> None:
        data = stream()
        aligner = PacketAligner()
        aligner.feed(data[:PACKET_SIZE + 50])
        aligner.reset()
        assert aligner.feed(data) is data
        assert aligner.resyncs == 0

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_any_split_yields_same_packets(self, data: st.DataObject) -> None:
        whole = stream(batches=3, per_batch=4)
        cuts = sorted(
            data.draw(
                st.lists(st.integers(min_value=0, max_value=len(whole)), max_size=20)
            )
        )
        aligner = PacketAligner()
        out = []
        for start, end in zip([0, *cuts], [*cuts, len(whole)]):
            chunk = aligner.feed(whole[start:end])
            assert len(chunk) % PACKET_SIZE == 0
            assert chunk[::PACKET_SIZE] == bytes([SYNC_BYTE]) * (len(chunk) // PACKET_SIZE)
            out.append(chunk)
        assert b"".join(out) == whole
        assert aligner.resyncs == 0


class TestTables:
    def test_crc_check_value(self) -> None:
        assert mpeg2_crc32(b"123456789") == 0x0376E6E7

    def test_pat(self) -> None:
        packet = pat_packet(5)
        assert len(packet) == PACKET_SIZE
        assert packet[0] == SYNC_BYTE and pid(packet) == PAT_PID
        assert packet[1] & 0x40, "payload_unit_start"
        assert packet[3] == 0x15
        body = section(packet)
        assert body[0] == 0x00
        assert mpeg2_crc32(body) == 0, "CRC over section including its CRC"
        program, pmt_pid = struct.unpack(">HH", body[8:12])
        assert (program, pmt_pid & 0x1FFF) == (1, PMT_PID)
        assert set(packet[5 + len(body) :]) == {0xFF}

    def test_pmt(self) -> None:
        packet = pmt_packet(17)
        assert len(packet) == PACKET_SIZE
        assert pid(packet) == PMT_PID and packet[3] == 0x11
        body = section(packet)
        assert body[0] == 0x02
        assert mpeg2_crc32(body) == 0
        assert struct.unpack(">H", body[3:5]) == (1,)
        pcr_pid, info_length = struct.unpack(">HH", body[8:12])
        assert (pcr_pid & 0x1FFF, info_length & 0x0FFF) == (DATA_PID, 0)
        stream_type, es_pid, es_info = struct.unpack(">BHH", body[12:17])
        assert (stream_type, es_pid & 0x1FFF, es_info & 0x0FFF) == (0x06, DATA_PID, 0)
        assert len(body) == 17 + 4

    def test_crc_detects_corruption(self) -> None:
        body = bytearray(section(pmt_packet(0)))
        body[4] ^= 0x01
        assert mpeg2_crc32(bytes(body)) != 0


class TestDataPackets:
    def test_layout(self) -> None:
        packet = data_packet(0x1234567890, TAG, 1700000000.25)
        assert len(packet) == PACKET_SIZE
        assert pid(packet) == DATA_PID
        assert packet[1] & 0x40
        assert packet[3] == 0x10 | 0x0
        assert packet[4:13] == b"\x00\x00\x01\xbd\x00\xb2\x80\x00\x00"
        assert packet[13:17] == b"ASIM"
        assert packet[17:21] == TAG
        assert struct.unpack(">Qd", packet[21:37]) == (0x1234567890, 1700000000.25)
        assert set(packet[37:]) == {0xFF}

    def test_round_trip(self) -> None:
        assert parse_data_packet(data_packet(77, TAG, 12.5)) == (77, TAG, 12.5)
        assert data_packet(77, TAG, 12.5)[3] == 0x10 | (77 & 0xF)

    def test_tables_are_not_data(self) -> None:
        assert parse_data_packet(pat_packet(0)) is None
        assert parse_data_packet(pmt_packet(0)) is None
        assert parse_data_packet(b"\x00" * PACKET_SIZE) is None
        assert parse_data_packet(data_packet(1, TAG, 0.0)[:100]) is None

    def test_batch_equals_single_packets(self) -> None:
        batch = data_packets(2**40 - 3, 40, TAG, 99.0)
        singles = b"".join(data_packet(2**40 - 3 + i, TAG, 99.0) for i in range(40))
        assert batch == singles
        assert data_packets(5, 0, TAG, 1.0) == b""

    def test_bad_tag_length(self) -> None:
        try:
            data_packet(1, b"abc", 0.0)
        except ValueError:
            pass
        else:
            raise AssertionError("a 3-byte tag was accepted")


class TestVerify:
    def test_good_stream(self) -> None:
        report = verify(stream(first_seq=10), content_tag=TAG)
        assert report.ok, report.describe()
        assert (report.packets, report.data_packets) == (28, 20)
        assert (report.first_seq, report.last_seq) == (10, 29)
        assert report.describe().startswith("OK")

    def test_gap(self) -> None:
        data = data_packets(0, 5, TAG, 0.0) + data_packets(9, 5, TAG, 0.0)
        report = verify(data)
        assert not report.ok
        assert report.gaps == [(5, 9)]
        assert "1 gaps" in report.describe() and "expected 5, got 9" in report.describe()
        assert verify(data, allowed_jumps=1).ok

    def test_duplicates(self) -> None:
        data = data_packets(0, 5, TAG, 0.0) + data_packets(3, 5, TAG, 0.0)
        report = verify(data)
        # Only the step back counts; 4 after 3 is in order again.
        assert report.duplicates == 1
        assert report.gaps == []
        assert (report.first_seq, report.last_seq) == (0, 7)
        assert not report.ok and "duplicate" in report.describe()

    def test_misaligned(self) -> None:
        data = stream()
        assert not verify(data[1:]).aligned
        assert not verify(data + b"\x47").aligned
        assert not verify(b"x" + data[:-1]).ok
        assert "not packet-aligned" in verify(data[5:]).describe()

    def test_wrong_tag(self) -> None:
        data = data_packets(0, 5, TAG, 0.0) + data_packets(5, 2, OTHER_TAG, 0.0)
        assert verify(data).ok
        report = verify(data, content_tag=TAG)
        assert report.wrong_tag == 2 and not report.ok
        assert "another content" in report.describe()

    def test_no_data_is_not_ok(self) -> None:
        report = verify(pat_packet(0) + pmt_packet(0))
        assert report.aligned and report.data_packets == 0 and not report.ok
        assert report.first_seq is None and report.last_seq is None
        assert not verify(b"").ok

    def test_constants(self) -> None:
        assert (synthetic.PACKET_SIZE, synthetic.SYNC_BYTE) == (188, 0x47)
        assert (synthetic.PAT_PID, synthetic.PMT_PID, synthetic.DATA_PID) == (0, 0x1000, 0x100)
