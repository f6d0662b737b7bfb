"""
One HLS segment as its stream's owner cut it: where in the ring buffer it
starts and ends, how long it plays, and the PAT and PMT it starts with.  It
is kept in the store, so that any worker can list it and put its bytes
together from the chunks it names.
"""

import base64
import json

import attrs


@attrs.frozen
class Segment:
    """
    @ivar sequence: its media sequence number, continuing across engine
        sessions and owners for as long as the store keeps the stream.
    @ivar start: the index of the chunk it starts in, and the offset of its
        first packet in that chunk's packets.
    @ivar end: where the next segment starts, likewise: the segment's last
        packet is the one before.
    @ivar duration: seconds of media it holds.
    @ivar discontinuity: its discontinuity sequence number, the count of
        engine-session changes before it.
    @ivar discontinuous: whether it is the first segment of a new engine
        session (C{#EXT-X-DISCONTINUITY} goes before it).
    @ivar psi: the PAT and PMT packets put in front of its packets, so that
        each segment can be decoded alone.
    """

    sequence: int
    start: tuple[int, int]
    end: tuple[int, int]
    duration: float
    discontinuity: int = 0
    discontinuous: bool = False
    psi: bytes = b""

    @property
    def chunks(self) -> int:
        """How many chunks hold its packets, from C{start}'s on."""
        index, offset = self.end
        return index - self.start[0] + (1 if offset else 0)

    def cut(self, chunks: list) -> bytes:
        """
        Its bytes, from C{chunks}' packets (the L{chunks} buffers from
        C{start}'s chunk on, in order): the PSI, then the packets from
        C{start} up to C{end}.
        """
        parts = [self.psi]
        last = len(chunks) - 1
        for position, data in enumerate(chunks):
            begin = self.start[1] if position == 0 else 0
            stop = self.end[1] if position == last and self.end[1] else len(data)
            parts.append(data[begin:stop])
        return b"".join(parts)

    def encode(self) -> str:
        return json.dumps(
            [
                self.sequence,
                *self.start,
                *self.end,
                round(self.duration, 6),
                self.discontinuity,
                int(self.discontinuous),
                base64.b64encode(self.psi).decode(),
            ]
        )

    @classmethod
    def decode(cls, text: str | bytes) -> "Segment | None":
        """The segment L{encode} wrote, or L{None} for anything else."""
        try:
            seq, s_index, s_offset, e_index, e_offset, duration, disc, flag, psi = json.loads(text)
            return cls(
                int(seq),
                (int(s_index), int(s_offset)),
                (int(e_index), int(e_offset)),
                float(duration),
                int(disc),
                bool(flag),
                base64.b64decode(psi, validate=True),
            )
        except (ValueError, TypeError):
            return None
