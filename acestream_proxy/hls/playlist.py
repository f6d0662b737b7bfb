"""
The live media playlist of a stream's segments (RFC 8216).
"""

import math

from .segment import Segment


def render(key: str, segments: list[Segment], target: float) -> bytes:
    """
    The playlist listing C{segments} (consecutive, oldest first), each
    named relative to C{/ace/manifest.m3u8}.  The target duration is at
    least C{target}, rounded up, and never shorter than a listed segment, as
    the RFC requires.
    """
    longest = max((s.duration for s in segments), default=target)
    first = segments[0] if segments else None
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:3",
        f"#EXT-X-TARGETDURATION:{math.ceil(max(target, longest - 0.0005))}",
        f"#EXT-X-MEDIA-SEQUENCE:{first.sequence if first else 0}",
    ]
    if first is not None and first.discontinuity:
        lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{first.discontinuity - first.discontinuous}")
    for segment in segments:
        if segment.discontinuous:
            lines.append("#EXT-X-DISCONTINUITY")
        lines.append(f"#EXTINF:{segment.duration:.3f},")
        lines.append(f"../hls/{key}/{segment.sequence}.ts")
    return ("\n".join(lines) + "\n").encode()
