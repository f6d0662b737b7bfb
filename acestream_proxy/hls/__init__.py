"""
HLS from the shared window: the owner of a stream cuts it into segments at
the video's keyframes (L{cutter}), each described by a L{segment.Segment}
kept in the store, and any worker serves the playlist and the segments' bytes
from its window (L{segments}) to viewers counted as players (L{viewer}).
"""
