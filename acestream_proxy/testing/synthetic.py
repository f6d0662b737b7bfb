"""
The synthetic, checkable MPEG-TS stream of the simulated engine: a PAT, a PMT
and private-data PES packets that carry a sequence number, a content tag and
the time they were sent, which lets a test prove that every viewer got every
packet, in order, of the right broadcast (L{verify}).
"""

from __future__ import annotations

import struct

import attrs

from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID, SYNC_BYTE, mpeg2_crc32

PMT_PID = 0x1000
DATA_PID = 0x100

#: Program number announced in the PAT and PMT.
PROGRAM_NUMBER = 1
#: PMT stream_type for PES packets with private data.
PRIVATE_PES_STREAM_TYPE = 0x06
#: Magic at the start of every data packet's PES payload.
DATA_MAGIC = b"ASIM"

_SYNC = bytes([SYNC_BYTE])
_STUFFING = 0xFF
_PES_START = b"\x00\x00\x01\xbd"  # private_stream_1
_PES_PACKET_LENGTH = 178
_PES_HEADER_TAIL = b"\x80\x00\x00"  # marker bits, no PTS/DTS, no header data
_TS_HEADER_SIZE = 4
_PAYLOAD_OFFSET = _TS_HEADER_SIZE + len(_PES_START) + 2 + len(_PES_HEADER_TAIL)
_SEQ_OFFSET = _PAYLOAD_OFFSET + len(DATA_MAGIC) + 4
_DATA_FIELDS = struct.Struct(">4s4sQd")  # magic, content tag, seq, sent_at
_SEQ = struct.Struct(">Q")
#: Where a data packet's content tag, seq and sent_at start (after the magic),
#: for whoever restamps data packets (L{acestream_proxy.testing.source}).
DATA_FIELDS_OFFSET = _PAYLOAD_OFFSET + len(DATA_MAGIC)
_DATA_PACKET_HEAD = bytes([SYNC_BYTE, 0x40 | (DATA_PID >> 8), DATA_PID & 0xFF])


def _psi_packet(pid: int, cc: int, section: bytes) -> bytes:
    """Wrap one PSI section (its CRC is appended here) into one TS packet."""
    section += struct.pack(">I", mpeg2_crc32(section))
    header = bytes([SYNC_BYTE, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | (cc & 0xF)])
    packet = header + b"\x00" + section  # pointer_field = 0
    return packet + bytes([_STUFFING]) * (PACKET_SIZE - len(packet))


def pat_packet(cc: int) -> bytes:
    """A PAT announcing one program whose PMT is on L{PMT_PID}."""
    body = struct.pack(
        ">HBBBHH",
        1,  # transport_stream_id
        0xC1,  # reserved, version 0, current_next_indicator
        0,  # section_number
        0,  # last_section_number
        PROGRAM_NUMBER,
        0xE000 | PMT_PID,
    )
    return _psi_packet(PAT_PID, cc, _section_header(0x00, body) + body)


def pmt_packet(cc: int) -> bytes:
    """
    A PMT for L{PROGRAM_NUMBER}: one private PES stream on L{DATA_PID}, which
    also serves as PCR PID (there is no PCR; demuxers tolerate that).
    """
    body = struct.pack(
        ">HBBBHH",
        PROGRAM_NUMBER,
        0xC1,
        0,
        0,
        0xE000 | DATA_PID,  # PCR_PID
        0xF000,  # program_info_length = 0
    ) + struct.pack(">BHH", PRIVATE_PES_STREAM_TYPE, 0xE000 | DATA_PID, 0xF000)
    return _psi_packet(PMT_PID, cc, _section_header(0x02, body) + body)


def _section_header(table_id: int, body: bytes) -> bytes:
    """table_id and section_length; the length counts the body and CRC."""
    return struct.pack(">BH", table_id, 0xB000 | (len(body) + 4))


def data_packet(seq: int, content_tag: bytes, sent_at: float) -> bytes:
    """
    One packet on L{DATA_PID} carrying a whole PES packet whose payload says
    which broadcast it belongs to (C{content_tag}, 4 bytes), its position in
    it (C{seq}) and when the engine sent it (C{sent_at}, wall-clock seconds).
    """
    if len(content_tag) != 4:
        raise ValueError(f"content_tag must be 4 bytes, not {content_tag!r}")
    packet = bytearray([_STUFFING]) * PACKET_SIZE
    packet[0:3] = _DATA_PACKET_HEAD
    packet[3] = 0x10 | (seq & 0xF)
    pes = _PES_START + struct.pack(">H", _PES_PACKET_LENGTH) + _PES_HEADER_TAIL
    packet[_TS_HEADER_SIZE : _PAYLOAD_OFFSET] = pes
    _DATA_FIELDS.pack_into(packet, _PAYLOAD_OFFSET, DATA_MAGIC, content_tag, seq, sent_at)
    return bytes(packet)


def data_packets(first_seq: int, count: int, content_tag: bytes, sent_at: float) -> bytes:
    """
    C{count} consecutive data packets starting at C{first_seq}, all sent at
    C{sent_at}.

    The simulated engine produces thousands of these a second per session, so
    this copies one template and patches only the sequence number and
    continuity counter of each packet.
    """
    if count <= 0:
        return b""
    batch = bytearray(data_packet(first_seq, content_tag, sent_at) * count)
    pack_seq = _SEQ.pack_into
    for index in range(count):
        seq = first_seq + index
        offset = index * PACKET_SIZE
        batch[offset + 3] = 0x10 | (seq & 0xF)
        pack_seq(batch, offset + _SEQ_OFFSET, seq)
    return bytes(batch)


def parse_data_packet(packet: bytes) -> tuple[int, bytes, float] | None:
    """
    Read C{(seq, content_tag, sent_at)} from a packet made by L{data_packet};
    C{None} for any other packet (PAT, PMT, foreign PIDs, garbage).
    """
    return _parse_at(packet, 0)


def _parse_at(data: bytes, offset: int) -> tuple[int, bytes, float] | None:
    """L{parse_data_packet} for the packet at C{offset}, without slicing."""
    if len(data) - offset < PACKET_SIZE or data[offset] != SYNC_BYTE:
        return None
    if data[offset + 1 : offset + 3] != _DATA_PACKET_HEAD[1:]:
        return None  # other PID, or no payload_unit_start
    if data[offset + 3] & 0x30 != 0x10:
        return None  # adaptation field present: not one of ours
    if data[offset + 4 : offset + 8] != _PES_START:
        return None
    magic, tag, seq, sent_at = _DATA_FIELDS.unpack_from(data, offset + _PAYLOAD_OFFSET)
    if magic != DATA_MAGIC:
        return None
    return seq, tag, sent_at


@attrs.frozen
class Report:
    """
    What L{verify} found in a captured stream.

    @ivar packets: Whole 188-byte slots in the data.
    @ivar data_packets: How many of them were data packets.
    @ivar first_seq: Sequence number of the first data packet, or C{None}.
    @ivar last_seq: Sequence number of the last data packet, or C{None}.
    @ivar aligned: Whether the data is whole packets, each starting with
        0x47, from its very first byte.
    @ivar gaps: C{(expected, got)} for every forward jump in sequence.
    @ivar duplicates: Data packets whose sequence number did not advance.
    @ivar wrong_tag: Data packets of another broadcast.
    @ivar allowed_jumps: How many gaps still count as L{ok} (a reconnect
        legitimately skips ahead).
    """

    packets: int
    data_packets: int
    first_seq: int | None
    last_seq: int | None
    aligned: bool
    gaps: list[tuple[int, int]]
    duplicates: int
    wrong_tag: int
    allowed_jumps: int = 0

    @property
    def ok(self) -> bool:
        """Whether the stream is what a faithful relay would deliver."""
        return (
            self.aligned
            and not self.duplicates
            and len(self.gaps) <= self.allowed_jumps
            and not self.wrong_tag
            and self.data_packets > 0
        )

    def describe(self) -> str:
        """One line for an assertion message."""
        seqs = (
            f"seq {self.first_seq}..{self.last_seq}"
            if self.data_packets
            else "no data packets"
        )
        problems = []
        if not self.aligned:
            problems.append("not packet-aligned")
        if len(self.gaps) > self.allowed_jumps:
            expected, got = self.gaps[0]
            problems.append(
                f"{len(self.gaps)} gaps (allowed {self.allowed_jumps}; "
                f"first: expected {expected}, got {got})"
            )
        if self.duplicates:
            problems.append(f"{self.duplicates} duplicate/backward packets")
        if self.wrong_tag:
            problems.append(f"{self.wrong_tag} packets of another content")
        verdict = "OK" if self.ok else "BAD: " + ", ".join(problems or ["empty"])
        return (
            f"{verdict} -- {self.packets} packets, {self.data_packets} data, "
            f"{seqs}, {len(self.gaps)} gaps"
        )


def verify(
    data: bytes, *, allowed_jumps: int = 0, content_tag: bytes | None = None
) -> Report:
    """
    Check a captured stream: packet alignment, sequence continuity and (when
    C{content_tag} is given) that every data packet is of that broadcast.
    """
    count = len(data) // PACKET_SIZE
    aligned = len(data) % PACKET_SIZE == 0 and data[::PACKET_SIZE] == _SYNC * count
    found = 0
    first = last = None
    gaps: list[tuple[int, int]] = []
    duplicates = wrong_tag = 0
    for offset in range(0, count * PACKET_SIZE, PACKET_SIZE):
        parsed = _parse_at(data, offset)
        if parsed is None:
            continue
        seq, tag, _ = parsed
        found += 1
        if content_tag is not None and tag != content_tag:
            wrong_tag += 1
        if last is None:
            first = seq
        elif seq <= last:
            duplicates += 1
        elif seq != last + 1:
            gaps.append((last + 1, seq))
        last = seq
    return Report(
        packets=count,
        data_packets=found,
        first_seq=first,
        last_seq=last,
        aligned=aligned,
        gaps=gaps,
        duplicates=duplicates,
        wrong_tag=wrong_tag,
        allowed_jumps=allowed_jumps,
    )
