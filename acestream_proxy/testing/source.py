"""
A real MPEG-TS file played by the simulated engine as a live broadcast
(C{twistd acesim --source FILE.ts}).

The file is read once, into memory, and served as an endless loop of its
packets on the engine's clock, so that a person can watch what the proxy
relays while the proxy sees what it would see from a real engine: a live
body that starts wherever the broadcast is when a player tunes in.

Looping jumps from the file's last packet back to its first: timestamps go
back and continuity counters jump, as at a splice in a real broadcast.
Players (VLC, mpv, libavformat) treat it as a discontinuity and carry on;
nothing is rewritten to hide it, so that what is served is the file's bytes.

Packets on the synthetic data PID (L{synthetic.DATA_PID}) in the file are
the exception: their sequence number, content tag and send time are written
at serve time, numbered on across loops, so that
L{synthetic.verify} checks a looped file's relay as it checks the synthetic
stream.
"""

from __future__ import annotations

import bisect
import struct
from pathlib import Path

import attrs

from acestream_proxy.stream.mpegts import PACKET_SIZE, SYNC_BYTE

from . import synthetic

#: Files above this size are refused: the whole file is held in memory.
MAX_SOURCE_BYTES = 512 * 1024 * 1024

#: The 27 MHz clock of a PCR.
PCR_HZ = 27_000_000

_SEQ_FIELDS = struct.Struct(">4sQd")  # content tag, seq, sent_at


class SourceError(Exception):
    """A source file that cannot be played; the message is one line."""


@attrs.frozen
class TsSource:
    """
    The packets of one MPEG-TS file and the bitrate to play them at.

    @ivar data: Whole packets, the file's trailing partial packet dropped.
    @ivar bitrate: Bits per second the file was estimated at from its PCRs,
        or L{None} when it carries too few of them.
    @ivar data_positions: Indexes of the packets that are synthetic data
        packets, ascending.
    """

    data: bytes
    bitrate: int | None
    data_positions: tuple[int, ...] = ()

    @property
    def packet_count(self) -> int:
        return len(self.data) // PACKET_SIZE

    def packets(self, first: int, end: int, tag: bytes, now: float) -> bytes:
        """
        The packets C{first} to C{end - 1} of the endless loop of the file:
        packet C{n} is the file's packet C{n mod packet_count}.  Data
        packets among them are stamped with C{tag}, C{now} and their
        sequence number counted over all loops.
        """
        count = self.packet_count
        out = bytearray()
        position = first
        while position < end:
            start = position % count
            take = min(end - position, count - start)
            out += self.data[start * PACKET_SIZE : (start + take) * PACKET_SIZE]
            position += take
        if self.data_positions:
            self._stamp(out, first, end, tag, now)
        return bytes(out)

    def _stamp(self, out: bytearray, first: int, end: int, tag: bytes, now: float) -> None:
        """Write tag, seq and send time into the data packets of C{out}."""
        count = self.packet_count
        per_loop = len(self.data_positions)
        positions = self.data_positions
        loop, start = divmod(first, count)
        offset = -start  # index in C{out} of this loop's packet 0
        while offset < end - first:
            rank = bisect.bisect_left(positions, max(0, -offset))
            while rank < per_loop:
                index = offset + positions[rank]
                if index >= end - first:
                    break
                seq = loop * per_loop + rank
                byte = index * PACKET_SIZE
                out[byte + 3] = (out[byte + 3] & 0xF0) | (seq & 0xF)
                _SEQ_FIELDS.pack_into(
                    out, byte + synthetic.DATA_FIELDS_OFFSET, tag, seq, now
                )
                rank += 1
            loop += 1
            offset += count


def load(path: str | Path, max_bytes: int = MAX_SOURCE_BYTES) -> TsSource:
    """
    Read a source file once and check that it is MPEG-TS.

    @raise SourceError: It is missing, unreadable, too large, or not TS.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as err:
        raise SourceError(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise SourceError(f"{path} is larger than {max_bytes} bytes")
    data = data[: len(data) - len(data) % PACKET_SIZE]
    count = len(data) // PACKET_SIZE
    if count < 2 or data[::PACKET_SIZE] != bytes([SYNC_BYTE]) * count:
        raise SourceError(
            f"{path} is not an MPEG-TS file (it must be whole 188-byte packets)"
        )
    return TsSource(data, estimate_bitrate(data), data_positions(data))


def data_positions(data: bytes) -> tuple[int, ...]:
    """Indexes of the synthetic data packets among C{data}'s packets."""
    return tuple(
        offset // PACKET_SIZE
        for offset in range(0, len(data), PACKET_SIZE)
        if synthetic.parse_data_packet(data[offset : offset + PACKET_SIZE]) is not None
    )


def pcr_of(packet: bytes) -> int | None:
    """The PCR (27 MHz ticks) a packet carries in its adaptation field, if any."""
    if not packet[3] & 0x20 or packet[4] < 7 or not packet[5] & 0x10:
        return None
    base = int.from_bytes(packet[6:11], "big") >> 7
    extension = int.from_bytes(packet[10:12], "big") & 0x1FF
    return base * 300 + extension


def estimate_bitrate(data: bytes) -> int | None:
    """
    The bitrate the file was muxed at: bytes between the first and last
    PCR of the first PID that carries one, over the time between them.
    L{None} when that PID has fewer than two PCRs or they do not advance
    (a wrap of the 33-bit clock inside the file, say).
    """
    pcr_pid = None
    first = last = None
    for offset in range(0, len(data), PACKET_SIZE):
        packet = data[offset : offset + PACKET_SIZE]
        pid = ((packet[1] & 0x1F) << 8) | packet[2]
        if pcr_pid is not None and pid != pcr_pid:
            continue
        pcr = pcr_of(packet)
        if pcr is None:
            continue
        pcr_pid = pid
        if first is None:
            first = (offset, pcr)
        last = (offset, pcr)
    if first is None or last is None or last[1] <= first[1]:
        return None
    return round((last[0] - first[0]) * 8 * PCR_HZ / (last[1] - first[1]))
