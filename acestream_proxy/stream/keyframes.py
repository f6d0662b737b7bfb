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
an adaptation field), and the packets of the PAT and PMT PIDs, a few a
second, whose tables it puts together across packets (L{SectionReader}).
"""

from __future__ import annotations

import attrs

from acestream_proxy.stream.mpegts import PACKET_SIZE, PAT_PID, crc_valid

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
#: PES stream_id of private_stream_1 and private_stream_2.
_PRIVATE_STREAM = _table(lambda b: b in (0xBD, 0xBF))


#: The longest PAT or PMT section, header and CRC included (ISO/IEC
#: 13818-1 caps their section_length at 1021).  A longer one is junk.
MAX_PSI_SECTION = 1024
#: The shortest: the 8 header bytes and the CRC.
_MIN_PSI_SECTION = 12
_STUFFING = 0xFF


@attrs.define
class SectionReader:
    """
    Reassemble the sections of one table from the packets of its PID.

    A section starts where a packet with payload_unit_start_indicator says
    (its pointer_field skips the end of the previous one) and may run on
    through the next packets of the PID; several may share a packet.  Only
    sections of C{table_id} are gathered, never more than L{MAX_PSI_SECTION}
    bytes of one: anything else, a packet missing (continuity counter) or a
    length out of bounds drops what was gathered, and the next pointer_field
    finds the next section.  A packet sent twice (the same bytes, the same
    counter, as a multiplexer may) counts once.  Each complete section is
    handed on only if its CRC is right.

    @ivar table_id: The table whose sections are wanted.
    """

    table_id: int
    _data: bytearray = attrs.field(factory=bytearray, init=False)
    _length: int = attrs.field(default=0, init=False)
    # The packets carrying the section being gathered: none when none is.
    _packets: list = attrs.field(factory=list, init=False)
    _cc: int | None = attrs.field(default=None, init=False)
    _last: bytes = attrs.field(default=b"", init=False)

    def feed(self, packet: bytes) -> list[tuple[bytes, tuple[bytes, ...]]]:
        """
        Take the PID's next packet.

        @return: Each wanted section completed in it, with the packets that
            carry it (from the one it starts in to this one), in order.
        """
        control = packet[3]
        if not control & 0x10:
            return []  # no payload, and the counter does not move
        cc = control & 0x0F
        if cc == self._cc and packet == self._last:
            return []
        follows = self._cc is not None and cc == (self._cc + 1) & 0x0F
        self._cc = cc
        self._last = packet
        start = 4
        if control & 0x20:
            start += 1 + packet[4]
        if start >= PACKET_SIZE:
            self._drop()
            return []
        done: list = []
        if not packet[1] & 0x40:
            if self._packets and follows:
                self._packets.append(packet)
                self._extend(packet, start, PACKET_SIZE, done)
            else:
                self._drop()
            return done
        begin = start + 1 + packet[start]  # after the pointer_field's bytes
        if self._packets and follows and begin <= PACKET_SIZE:
            # The end of the section in progress comes before the new one.
            self._packets.append(packet)
            self._extend(packet, start + 1, begin, done)
        self._drop()
        position = begin
        while position < PACKET_SIZE and packet[position] != _STUFFING:
            self._packets = [packet]
            position = self._extend(packet, position, PACKET_SIZE, done)
        return done

    def _extend(self, packet: bytes, position: int, end: int, done: list) -> int:
        """
        Add C{packet[position:end]} to the section being gathered, as far as
        it goes; a complete section goes to C{done}.

        @return: Where in C{packet} the section ended, or C{end}.
        """
        data = self._data
        if len(data) < 3:
            take = min(3 - len(data), end - position)
            data += packet[position : position + take]
            position += take
            if len(data) < 3:
                return end
            length = 3 + (((data[1] & 0x0F) << 8) | data[2])
            if data[0] != self.table_id or not _MIN_PSI_SECTION <= length <= MAX_PSI_SECTION:
                # Another table's section, or junk: passed over.
                self._drop()
                return position + length - 3
            self._length = length
        take = min(self._length - len(data), end - position)
        data += packet[position : position + take]
        position += take
        if len(data) == self._length:
            section = bytes(data)
            if crc_valid(section):
                done.append((section, tuple(self._packets)))
            self._drop()
            return position
        return end

    def _drop(self) -> None:
        """Forget the section being gathered, if any."""
        self._data = bytearray()
        self._length = 0
        self._packets = []


def _program(pat: bytes) -> tuple[int, int] | None:
    """
    The (program_number, PMT PID) of the PAT's first program (network PIDs
    skipped).
    """
    end = len(pat) - 4  # CRC
    for pos in range(8, end - 3, 4):
        program = (pat[pos] << 8) | pat[pos + 1]
        if program:
            return program, ((pat[pos + 2] & 0x1F) << 8) | pat[pos + 3]
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


def _bare_data(data: bytes, count: int) -> bool:
    """
    Whether each of the C{count} packets of C{data} starts a PES packet of
    private data (private_stream_1 or 2) right after its header: checked
    on whole columns of bytes at once.
    """
    columns = [data[offset::PACKET_SIZE][:count] for offset in range(1, 8)]
    return (
        columns[0].translate(_PUSI) == _ONE * count
        and columns[2].translate(_HAS_ADAPTATION) == bytes(count)
        and columns[3] == columns[4] == bytes(count)
        and columns[5] == _ONE * count
        and columns[6].translate(_PRIVATE_STREAM) == _ONE * count
    )


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
    a packet boundary), it keeps the packets that carry the latest PAT and
    PMT, which a player joining at a random-access point needs in front, and
    reports where in each run such points are: a packet of the video PID
    with the adaptation field's random_access_indicator, or one that starts
    a PES packet holding an MPEG-2 sequence header, an H.264 IDR (or SPS
    that leads to one) or an HEVC IRAP picture.

    A PMT that lists many streams and descriptors spans several packets: its
    sections are put together from all the packets of the PID (see
    L{SectionReader}), and a table is believed only with a correct CRC, so
    that one damaged packet cannot move the video PID.  Those PIDs carry a
    few packets a second, so this costs little beside the video's scan.

    @ivar pat: The packets of the latest PAT, or C{None} before the first.
    @ivar pmt: The packets of the latest PMT of the PAT's program, or
        C{None}.
    @ivar program: The PAT's program (its first, network PIDs skipped).
    @ivar video_pid: The PMT's video PID, or C{None} (no PMT yet, or no
        video: radio, the synthetic test stream).
    """

    pat: bytes | None = None
    pmt: bytes | None = None
    program: int | None = None
    pmt_pid: int | None = None
    video_pid: int | None = None
    stream_type: int | None = None
    _pat_reader: SectionReader = attrs.field(
        factory=lambda: SectionReader(_PAT_TABLE_ID), init=False, repr=False
    )
    _pmt_reader: SectionReader = attrs.field(
        factory=lambda: SectionReader(_PMT_TABLE_ID), init=False, repr=False
    )
    # The sections the PAT and PMT were last read from: a repeat of the same
    # table (every few hundred milliseconds) only renews their packets.
    _pat_section: bytes = attrs.field(default=b"", init=False, repr=False)
    _pmt_section: bytes = attrs.field(default=b"", init=False, repr=False)
    # The PAT and PMT packets together, made when first asked for after a
    # table came again (None until then): every chunk with a random-access
    # point in between shares this one object.
    _psi: bytes | None = attrs.field(default=None, init=False, repr=False)
    # Whether every packet before the PMT was bare private data.
    _bare_data: bool = attrs.field(default=True, init=False, repr=False)
    _tables: dict[int, tuple[bytes, bytes]] = attrs.field(factory=dict, init=False, repr=False)

    @property
    def has_video(self) -> bool | None:
        """
        Whether the stream has a video PID whose points this finds: C{None}
        while it may, its PMT not seen yet.  A stream that so far is nothing
        but whole PES packets of private data, one a packet (the synthetic
        test stream's data packets, without its PAT and PMT), counts as
        having none: it is no program, and will not turn into one.
        """
        if self.pmt is None:
            return False if self._bare_data else None
        return self.video_pid is not None

    @property
    def psi(self) -> bytes:
        """
        What a player or an HLS segment starting at a random-access point
        needs in front: every packet of the latest PAT and PMT, or nothing
        before they are known.
        """
        if self.pmt is None:
            return b""
        if self._psi is None:
            self._psi = self.pat + self.pmt
        return self._psi

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
        self._read_tables(data, count)
        if self.pmt is None and self._bare_data:
            self._bare_data = _bare_data(data, count)
        if self.video_pid is None:
            return ()
        return tuple(
            index * PACKET_SIZE
            for index in self._candidates(data, count, self.video_pid, True)
            if self._is_random_access(data[index * PACKET_SIZE : (index + 1) * PACKET_SIZE])
        )

    def _read_tables(self, data: bytes, count: int) -> None:
        """Keep the latest PAT and PMT, and what they say."""
        for index in self._candidates(data, count, PAT_PID, False):
            packet = data[index * PACKET_SIZE : (index + 1) * PACKET_SIZE]
            for section, packets in self._pat_reader.feed(packet):
                self._take_pat(section, packets)
        if self.pmt_pid is None:
            return
        for index in self._candidates(data, count, self.pmt_pid, False):
            packet = data[index * PACKET_SIZE : (index + 1) * PACKET_SIZE]
            for section, packets in self._pmt_reader.feed(packet):
                self._take_pmt(section, packets)

    def _take_pat(self, section: bytes, packets: tuple[bytes, ...]) -> None:
        """A PAT section with a good CRC: its program's PMT is followed."""
        self.pat = b"".join(packets)
        if section != self._pat_section:
            self._pat_section = section
            program, pmt_pid = _program(section) or (None, None)
            if (program, pmt_pid) != (self.program, self.pmt_pid):
                self.program, self.pmt_pid = program, pmt_pid
                self._pmt_reader = SectionReader(_PMT_TABLE_ID)
                self.pmt = None
                self._pmt_section = b""
                self.video_pid = self.stream_type = None
        self._psi = None

    def _take_pmt(self, section: bytes, packets: tuple[bytes, ...]) -> None:
        """
        A PMT section with a good CRC: that of the PAT's program (programs
        may share a PMT PID) names the video PID.
        """
        if ((section[3] << 8) | section[4]) != self.program:
            return
        self.pmt = b"".join(packets)
        if section != self._pmt_section:
            self._pmt_section = section
            found = _video_pid(section)
            self.video_pid, self.stream_type = found if found else (None, None)
        self._psi = None

    def _candidates(self, data: bytes, count: int, pid: int, random_access: bool) -> list[int]:
        """
        The indices of C{pid}'s packets (with C{random_access}, only those
        that start a payload unit or carry an adaptation field), found on
        whole columns of header bytes at once rather than packet by packet.
        """
        high, low = self._pid_tables(pid)
        mask = int.from_bytes(data[1::PACKET_SIZE][:count].translate(high), "big")
        mask &= int.from_bytes(data[2::PACKET_SIZE][:count].translate(low), "big")
        if not mask:
            return []
        if random_access:
            mask &= int.from_bytes(
                data[1::PACKET_SIZE][:count].translate(_PUSI), "big"
            ) | int.from_bytes(data[3::PACKET_SIZE][:count].translate(_HAS_ADAPTATION), "big")
        hits = mask.to_bytes(count, "big")
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
                _nal_types(payload, False),
                range(_H264_IDR, _H264_IDR + 1),
                _H264_SPS,
                range(_H264_NON_IDR_SLICE, _H264_NON_IDR_SLICE + 1),
            )
        if self.stream_type == HEVC_VIDEO:
            return _starts_access(
                _nal_types(payload, True), _HEVC_IRAP, _HEVC_VPS, _HEVC_NON_IRAP_SLICES
            )
        return _MPEG2_SEQUENCE_HEADER in payload
