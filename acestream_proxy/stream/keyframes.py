"""
Where a player can start decoding: random-access points of a stream's video.

A player that joins mid-stream at an arbitrary packet gets a picture only
once the next keyframe arrives, and its decoder complains about every frame
before it.  Starting it on a random-access point of the video PID, with the
current PAT and PMT in front, gives a clean first frame.  Audio PIDs are no
help: they carry the random-access flag on nearly every frame, so a join at an
audio one still begins with broken video.

L{KeyframeScanner} finds those points as the data goes by.  It runs on every
chunk of every stream, so it looks at packet headers through strided slices
and big-integer masks and only inspects the few packets that could be a
random-access point (those of the video PID that start a PES packet or carry
an adaptation field).
"""

from __future__ import annotations

import attrs

from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID

#: PMT stream_type values of the video codecs whose keyframes we recognise.
MPEG1_VIDEO = 0x01
MPEG2_VIDEO = 0x02
H264_VIDEO = 0x1B
HEVC_VIDEO = 0x24
VIDEO_STREAM_TYPES = frozenset({MPEG1_VIDEO, MPEG2_VIDEO, H264_VIDEO, HEVC_VIDEO})

_PAT_TABLE_ID = 0x00
_PMT_TABLE_ID = 0x02
_START_CODE = b"\x00\x00\x01"
_MPEG2_SEQUENCE_HEADER = b"\x00\x00\x01\xb3"
_H264_IDR = 5
_H264_SPS = 7
_H264_NON_IDR_SLICE = 1
_HEVC_IRAP = range(16, 22)
_HEVC_VPS = 32
_HEVC_NON_IRAP_SLICES = range(0, 16)

_ONE = b"\x01"


def _table(keep) -> bytes:
    """A C{bytes.translate} table mapping a header byte to 1 or 0."""
    return bytes(1 if keep(b) else 0 for b in range(256))


_PUSI = _table(lambda b: b & 0x40)
_HAS_ADAPTATION = _table(lambda b: b & 0x20)


def _section(packet: bytes) -> bytes | None:
    """
    The PSI section that starts in C{packet}, or C{None}.  Tables longer than
    one packet are cut at its end; the fields we read come first.
    """
    if not packet[1] & 0x40:
        return None
    start = 4
    if packet[3] & 0x20:
        start += 1 + packet[4]
    if not packet[3] & 0x10 or start >= PACKET_SIZE:
        return None
    start += 1 + packet[start]  # pointer_field
    if start + 3 > PACKET_SIZE:
        return None
    length = ((packet[start + 1] & 0x0F) << 8) | packet[start + 2]
    return packet[start : min(start + 3 + length, PACKET_SIZE)]


def _pmt_pid(pat: bytes) -> int | None:
    """The PMT PID of the PAT's first program (network PIDs skipped)."""
    end = len(pat) - 4  # CRC
    for pos in range(8, end - 3, 4):
        program = (pat[pos] << 8) | pat[pos + 1]
        if program:
            return ((pat[pos + 2] & 0x1F) << 8) | pat[pos + 3]
    return None


def _video_pid(pmt: bytes) -> tuple[int, int] | None:
    """The (PID, stream_type) of the PMT's first video stream we know."""
    if len(pmt) < 12:
        return None
    info = ((pmt[10] & 0x0F) << 8) | pmt[11]
    pos = 12 + info
    length = ((pmt[1] & 0x0F) << 8) | pmt[2]
    end = min(3 + length - 4, len(pmt))
    while pos + 5 <= end:
        stream_type = pmt[pos]
        pid = ((pmt[pos + 1] & 0x1F) << 8) | pmt[pos + 2]
        if stream_type in VIDEO_STREAM_TYPES:
            return pid, stream_type
        pos += 5 + (((pmt[pos + 3] & 0x0F) << 8) | pmt[pos + 4])
    return None


def _nal_types(payload: bytes, hevc: bool) -> list[int]:
    """The NAL unit types whose start codes lie in C{payload}."""
    types = []
    pos = payload.find(_START_CODE)
    while 0 <= pos < len(payload) - 3:
        header = payload[pos + 3]
        types.append((header >> 1) & 0x3F if hevc else header & 0x1F)
        pos = payload.find(_START_CODE, pos + 3)
    return types


def _starts_access(types: list[int], access: range, parameters: int, slices) -> bool:
    """
    Whether these NAL types open a random-access point: one of C{access}, or
    parameter sets not followed, within this packet, by an ordinary slice
    (the keyframe they precede lies in the next packets).
    """
    seen_parameters = False
    for kind in types:
        if kind in access:
            return True
        if kind == parameters:
            seen_parameters = True
        elif kind in slices:
            return False
    return seen_parameters


@attrs.define
class KeyframeScanner:
    """
    Follow one stream's PAT and PMT and find its video random-access points.

    Fed the stream's whole packets run by run (in order, each run starting on
    a packet boundary), it keeps the latest PAT and PMT packets, which a
    player joining at a random-access point needs in front, and reports where
    in each run such points are: a packet of the video PID with the
    adaptation field's random_access_indicator, or one that starts a PES
    packet holding an MPEG-2 sequence header, an H.264 IDR (or SPS that
    leads to one) or an HEVC IRAP picture.

    @ivar pat: The latest PAT packet, or C{None} before the first.
    @ivar pmt: The latest PMT packet of the PAT's program, or C{None}.
    @ivar video_pid: The PMT's video PID, or C{None} (no PMT yet, or no
        video: radio, the synthetic test stream).
    """

    pat: bytes | None = None
    pmt: bytes | None = None
    pmt_pid: int | None = None
    video_pid: int | None = None
    stream_type: int | None = None
    _tables: dict[int, tuple[bytes, bytes]] = attrs.field(factory=dict, init=False, repr=False)

    def psi_for(self, access: tuple[int, ...]) -> bytes:
        """
        What a player starting at one of C{access} needs in front: the
        latest PAT and PMT, or nothing when there is no such point.
        """
        return self.pat + self.pmt if access else b""

    def feed(self, data: bytes) -> tuple[int, ...]:
        """
        Scan the next run of whole packets.

        @return: The byte offsets within C{data} of the packets that are
            random-access points of the video PID, in order.
        """
        data = bytes(data)
        count = len(data) // PACKET_SIZE
        if not count:
            return ()
        # Until a PMT (in this run or an earlier one) names the video PID,
        # nothing is reported: no player could use it without that PMT.
        self._psi(data, count)
        if self.video_pid is None:
            return ()
        return tuple(
            index * PACKET_SIZE
            for index in self._candidates(data, count, self.video_pid, True)
            if self._is_random_access(data[index * PACKET_SIZE : (index + 1) * PACKET_SIZE])
        )

    def _psi(self, data: bytes, count: int) -> None:
        """Keep the latest PAT and PMT, and what they say."""
        for packet, section in self._sections(data, count, PAT_PID, _PAT_TABLE_ID):
            self.pat = packet
            pmt_pid = _pmt_pid(section)
            if pmt_pid != self.pmt_pid:
                self.pmt_pid = pmt_pid
                self.pmt = None
                self.video_pid = self.stream_type = None
        if self.pmt_pid is None:
            return
        for packet, section in self._sections(data, count, self.pmt_pid, _PMT_TABLE_ID):
            self.pmt = packet
            found = _video_pid(section)
            self.video_pid, self.stream_type = found if found else (None, None)

    def _sections(self, data: bytes, count: int, pid: int, table_id: int):
        """
        Each packet of C{pid} in which a C{table_id} section starts, with
        that section.
        """
        for index in self._candidates(data, count, pid, False):
            packet = data[index * PACKET_SIZE : (index + 1) * PACKET_SIZE]
            section = _section(packet)
            if section is not None and section[0] == table_id:
                yield packet, section

    def _candidates(self, data: bytes, count: int, pid: int, adaptation: bool) -> list[int]:
        """
        The indices of C{pid}'s packets that start a payload unit (or, with
        C{adaptation}, carry an adaptation field), found on whole columns of
        header bytes at once rather than packet by packet.
        """
        high, low = self._pid_tables(pid)
        mask = int.from_bytes(data[1::PACKET_SIZE][:count].translate(high), "big")
        mask &= int.from_bytes(data[2::PACKET_SIZE][:count].translate(low), "big")
        if not mask:
            return []
        flags = int.from_bytes(data[1::PACKET_SIZE][:count].translate(_PUSI), "big")
        if adaptation:
            flags |= int.from_bytes(
                data[3::PACKET_SIZE][:count].translate(_HAS_ADAPTATION), "big"
            )
        hits = (mask & flags).to_bytes(count, "big")
        found = []
        index = hits.find(_ONE)
        while index >= 0:
            found.append(index)
            index = hits.find(_ONE, index + 1)
        return found

    def _pid_tables(self, pid: int) -> tuple[bytes, bytes]:
        """The translate tables matching the two header bytes of C{pid}."""
        tables = self._tables.get(pid)
        if tables is None:
            if len(self._tables) > 8:
                self._tables.clear()
            tables = (
                _table(lambda b: (b & 0x1F) == pid >> 8),
                _table(lambda b: b == pid & 0xFF),
            )
            self._tables[pid] = tables
        return tables

    def _is_random_access(self, packet: bytes) -> bool:
        """Whether this video packet is a place to start decoding."""
        start = 4
        if packet[3] & 0x20:
            length = packet[4]
            if length and packet[5] & 0x40:
                return True
            start += 1 + length
        if not packet[1] & 0x40 or not packet[3] & 0x10:
            return False
        pes = packet[start:]
        if len(pes) < 9 or not pes.startswith(_START_CODE):
            return False
        payload = pes[9 + pes[8] :]
        if self.stream_type == H264_VIDEO:
            return _starts_access(
                _nal_types(payload, False), range(_H264_IDR, _H264_IDR + 1),
                _H264_SPS, range(_H264_NON_IDR_SLICE, _H264_NON_IDR_SLICE + 1),
            )
        if self.stream_type == HEVC_VIDEO:
            return _starts_access(
                _nal_types(payload, True), _HEVC_IRAP, _HEVC_VPS, _HEVC_NON_IRAP_SLICES
            )
        return _MPEG2_SEQUENCE_HEADER in payload
