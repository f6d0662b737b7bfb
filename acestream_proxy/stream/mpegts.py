"""
MPEG transport stream handling on the proxy's path.

The proxy cuts an engine's byte stream into whole 188-byte packets (players
choke on a packet torn in half when they join mid-stream): that is
L{PacketAligner}.  L{mpeg2_crc32} checks and builds PSI sections.
"""

from __future__ import annotations

import zlib

import attrs

PACKET_SIZE = 188
SYNC_BYTE = 0x47
PAT_PID = 0

_SYNC = bytes([SYNC_BYTE])


@attrs.define
class PacketAligner:
    """
    Cut an arbitrary byte stream into whole transport stream packets.

    TCP hands us the stream in pieces of any size, and an engine that hiccups
    may even put stray bytes between packets.  Everything the proxy forwards
    has to start on a packet boundary, so this keeps the trailing partial
    packet for the next call and, when the stream loses sync, drops bytes
    until three (or, near the end of the data, two) sync bytes line up 188
    bytes apart.

    @ivar resyncs: How many times the stream lost packet alignment.
    @ivar discarded: How many bytes were dropped to regain it.
    """

    resyncs: int = 0
    discarded: int = 0
    _pending: bytes = attrs.field(default=b"", init=False, repr=False)
    _synced: bool = attrs.field(default=True, init=False, repr=False)

    def feed(self, data: bytes) -> bytes:
        """
        Take the next piece of the stream; return the whole packets it
        completes, possibly C{b""}.

        Aligned input with nothing carried over is returned as the very same
        object: that is the common case and the proxy's hot path.
        """
        if self._synced and not self._pending:
            count, partial = divmod(len(data), PACKET_SIZE)
            if not partial and data[::PACKET_SIZE] == _SYNC * count:
                return data
        buf = self._pending + data if self._pending else bytes(data)
        out: list[bytes] = []
        pos = 0
        while pos < len(buf):
            if not self._synced:
                pos = self._find_sync(buf, pos)
                if not self._synced:
                    break
            pos, complete = self._take_aligned(buf, pos, out)
            if complete:
                break
        self._pending = buf[pos:]
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def reset(self) -> None:
        """
        Forget the carried-over partial packet, because the stream it belonged
        to is gone (the engine connection was re-established).
        """
        self._pending = b""
        self._synced = True

    def _take_aligned(self, buf: bytes, pos: int, out: list[bytes]) -> tuple[int, bool]:
        """
        Move the run of well-formed whole packets at C{pos} to C{out}.

        @return: The new position, and whether the rest of C{buf} is merely a
            partial packet (C{True}) rather than a loss of sync (C{False}).
        """
        whole = (len(buf) - pos) // PACKET_SIZE
        if not whole:
            return pos, True
        stop = pos + whole * PACKET_SIZE
        starts = buf[pos:stop:PACKET_SIZE]
        good = whole - len(starts.lstrip(_SYNC))
        if good:
            end = pos + good * PACKET_SIZE
            out.append(buf[pos:end])
            pos = end
        if good == whole:
            return pos, True
        self.resyncs += 1
        self._synced = False
        return pos, False

    def _find_sync(self, buf: bytes, pos: int) -> int:
        """
        Drop bytes from C{pos} up to the next confirmed packet start.

        A lone 0x47 proves nothing (it is a common payload byte), so a
        candidate only counts when the next packet, and the one after when
        present, start with 0x47 as well.  A candidate that cannot be
        confirmed yet is kept for the next call.

        @return: The position of the confirmed packet start, or of the
            unconfirmed candidate (sync stays lost), or C{len(buf)}.
        """
        search = pos
        while True:
            candidate = buf.find(_SYNC, search)
            if candidate < 0:
                self.discarded += len(buf) - pos
                return len(buf)
            if candidate + PACKET_SIZE >= len(buf):
                break
            if buf[candidate + PACKET_SIZE] == SYNC_BYTE and (
                candidate + 2 * PACKET_SIZE >= len(buf)
                or buf[candidate + 2 * PACKET_SIZE] == SYNC_BYTE
            ):
                self._synced = True
                break
            search = candidate + 1
        self.discarded += candidate - pos
        return candidate


def pes_pts(packet) -> int | None:
    """
    The presentation time stamp (90 kHz, 33 bits) of the PES packet that
    starts in this TS packet, or L{None} when none starts there or it has
    no PTS.
    """
    if len(packet) < PACKET_SIZE or not packet[1] & 0x40 or not packet[3] & 0x10:
        return None
    start = 4
    if packet[3] & 0x20:
        start += 1 + packet[4]
    pes = bytes(packet[start : start + 14])
    if len(pes) < 14 or not pes.startswith(b"\x00\x00\x01") or not pes[7] & 0x80:
        return None
    return (
        ((pes[9] >> 1) & 0x07) << 30
        | pes[10] << 22
        | (pes[11] >> 1) << 15
        | pes[12] << 7
        | pes[13] >> 1
    )


#: Each byte with its bits in reverse order.
_REVERSED_BITS = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def mpeg2_crc32(data: bytes) -> int:
    """
    CRC-32/MPEG-2 (polynomial 0x04C11DB7, initial value 0xFFFFFFFF, no
    reflection, no final xor), which PSI sections must end with or demuxers
    ignore the table.

    zlib's CRC-32 has the same polynomial and initial value but shifts bits
    the other way and inverts its result: fed bit-reversed bytes, with its
    result inverted and bit-reversed back, it gives this one, in C rather
    than in a Python loop (the scanner checks every PAT and PMT it reads).
    """
    reflected = zlib.crc32(bytes(data).translate(_REVERSED_BITS)) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def crc_valid(section: bytes) -> bool:
    """Whether C{section} ends with its correct MPEG-2 CRC-32."""
    return mpeg2_crc32(section) == 0
