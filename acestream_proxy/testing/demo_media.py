"""
The demo's broadcast: a few seconds of a test picture with a running clock
and a tone in MPEG-TS, made once with PyAV and kept in the user's cache.

It comes in two codings (L{CODINGS}), each a file of its own: H.264 video
and AAC audio (L{H264}, the default), which browsers play as well as VLC
and mpv, and MPEG-2 video and MP2 audio (L{MPEG2}), which VLC and mpv play
but browsers do not.

The synthetic data packets (L{synthetic.DATA_PID}) are interleaved with the
audio and video, so that the one stream is both watchable in VLC or mpv and
checkable byte for byte with L{synthetic.verify} (the simulated engine
numbers them as it serves the file: see L{acestream_proxy.testing.source}).
They take the place of the null packets the muxer pads its constant rate
with, so that no timing in the file changes.

PyAV is needed only to make the file, so it is imported only there: the
simulated engine and the daemon never import it.  Its wheels ship libx264
and libavcodec's AAC, MPEG-2 and MP2 encoders, so no system package is
needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import attrs

from acestream_proxy.stream.mpegts import PACKET_SIZE

from . import synthetic

WIDTH = 512
HEIGHT = 288
FPS = 25
#: One keyframe a second, so a player that tunes in waits at most that long.
GOP = 25
SECONDS = 20
VIDEO_BITRATE = 1_200_000
SAMPLE_RATE = 48_000
AUDIO_BITRATE = 128_000
#: 40 whole periods in a video frame's 1920 samples, so the tone has no click.
TONE_HZ = 1000
#: The muxer pads to this constant rate with null packets, which then
#: become the data packets: the file's PCRs stay exact, and its bitrate
#: (which the engine paces it by) is this.
MUX_RATE = 2_000_000
NULL_PID = 0x1FFF
#: The muxer's first elementary-stream PID; its default (0x100) is
#: L{synthetic.DATA_PID}, which the data packets keep for themselves.
START_PID = 0x200
#: Bumped whenever what L{generate} makes changes, so a cached file of an
#: older version is not played.
VERSION = 2


@attrs.frozen
class Coding:
    """
    The encoders of one coding of the demo, with their options (PyAV's
    C{add_stream} options: libavcodec's and the encoder's own).
    """

    #: In the cached file's name, so that each coding is cached apart.
    name: str
    video: str
    audio: str
    video_options: dict = attrs.field(factory=dict)

    @property
    def file_name(self) -> str:
        return f"demo-{self.name}-v{VERSION}.ts"


#: H.264 Main profile and AAC-LC: a browser's native HLS plays these.
#: Every keyframe is an IDR picture (no scene cuts, no B-frames: x264's
#: C{keyint} with C{min-keyint} equal to it), and x264 repeats the SPS and
#: PPS in front of each, since the MPEG-TS muxer asks for no global
#: header: a player that joins at any keyframe can decode from it.  The
#: rate is constant (HRD CBR: x264 pads with filler data), as broadcasters
#: send it: the still picture alone would take a packet now and then, and
#: the stream be little but data packets.  It is well below L{MUX_RATE},
#: so that the muxer always has null packets left to become data packets.
H264 = Coding(
    "h264",
    "libx264",
    "aac",
    {
        "preset": "veryfast",
        "profile": "main",
        "x264-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0:bframes=0:nal-hrd=cbr",
        "maxrate": str(VIDEO_BITRATE),
        "bufsize": str(VIDEO_BITRATE),
    },
)
MPEG2 = Coding("mpeg2", "mpeg2video", "mp2")
CODINGS = {coding.name: coding for coding in (H264, MPEG2)}
DEFAULT = H264
#: The default coding's file, in L{cache_dir}.
FILE_NAME = DEFAULT.file_name

# BT.601 limited-range colour bars (Y, Cb, Cr): white, yellow, cyan,
# green, magenta, red, blue, black.
_BARS = [
    (235, 128, 128),
    (210, 16, 146),
    (170, 166, 16),
    (145, 54, 34),
    (106, 202, 222),
    (81, 90, 240),
    (41, 240, 110),
    (16, 128, 128),
]

# A 3x5 bitmap font: the clock's digits and colon.
_FONT = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ":": ("000", "010", "000", "010", "000"),
}
_SCALE = 8  # pixels per font cell
_CLOCK_X = 48
_CLOCK_Y = 200
_CLOCK_TEXT_WIDTH = 8 * 4 * _SCALE  # "MM:SS:FF", 3 cells and a gap each


def cache_dir() -> Path:
    """
    Where the demo's file is kept between runs: C{$XDG_CACHE_HOME/aceproxy},
    or C{~/.cache/aceproxy}, as other programs keep regenerable files.
    """
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aceproxy"


def demo_file(path: Path | None = None, coding: Coding = DEFAULT) -> Path:
    """
    The demo's MPEG-TS file at C{path} (default: C{coding}'s file name in
    L{cache_dir}), made in C{coding} if missing: encoding takes a few
    seconds, which the demo should not pay at every start.
    """
    if path is None:
        path = cache_dir() / coding.file_name
    if not path.exists():
        generate(path, coding=coding)
    return path


def generate(path: Path, seconds: int = SECONDS, coding: Coding = DEFAULT) -> None:
    """
    Make the demo file at C{path}, in C{coding}: written beside it and
    renamed into place, so an interrupted run leaves no half file to be
    played later.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    _encode(partial, seconds, coding)
    partial.write_bytes(nulls_to_data(partial.read_bytes()))
    partial.replace(path)


def _encode(path: Path, seconds: int, coding: Coding) -> None:
    """Encode the picture and the tone and mux them into MPEG-TS."""
    import av  # a test/demo extra: see the module docstring

    # The first packet of each PID says it follows a discontinuity (its
    # adaptation field's discontinuity_indicator): the file is played in a
    # loop, and where it starts again its continuity counters and clocks
    # jump, which a demuxer then takes for the splice it is, not for loss.
    # The clock (PCR) starts 0.7 s ahead of the first decoding time, as
    # ffmpeg's command line has it: with none, every frame's packets would
    # arrive after the time it is to be decoded at, which the muxer warns
    # makes the stream invalid.
    options = {
        "mpegts_start_pid": str(START_PID),
        "muxrate": str(MUX_RATE),
        "mpegts_flags": "+initial_discontinuity",
        "max_delay": "700000",
    }
    with av.open(str(path), "w", format="mpegts", options=options) as container:
        video = container.add_stream(coding.video, rate=FPS, options=dict(coding.video_options))
        video.width, video.height = WIDTH, HEIGHT
        video.pix_fmt = "yuv420p"
        video.bit_rate = VIDEO_BITRATE
        video.codec_context.gop_size = GOP
        # No B-frames: the stream starts with, and every GOP is, a
        # keyframe followed by frames that need only earlier ones.
        video.codec_context.max_b_frames = 0
        # PyAV converts the tone's 16-bit samples to the encoder's format
        # and frame size (AAC takes planar floats, 1024 samples a frame).
        audio = container.add_stream(coding.audio, rate=SAMPLE_RATE)
        audio.layout = "mono"
        audio.bit_rate = AUDIO_BITRATE
        # Declares the data PID in the PMT, so that demuxers leave it
        # alone; nothing is muxed on it here (see L{nulls_to_data}).  As
        # KLV (stream type 0x15, registration "KLVA"), a data codec
        # libavformat knows and no player decodes: as plain private data
        # (0x06) libavformat would probe its packets, whose numbers it can
        # take for a video codec, and fail to open the whole stream.
        data = container.add_data_stream("klv")
        data.id = synthetic.DATA_PID
        planes = _background()
        primed = _Priming()
        tone = _tone_samples()
        samples_per_frame = SAMPLE_RATE // FPS
        for index in range(seconds * FPS):
            frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
            luma = bytearray(planes[0])
            _draw_clock(luma, index)
            for number, (plane, data) in enumerate(zip(frame.planes, (luma, *planes[1:]))):
                _fill_plane(plane, bytes(data), WIDTH if number == 0 else WIDTH // 2)
            frame.pts = index
            for packet in video.encode(frame):
                container.mux(packet)
            sound = av.AudioFrame(format="s16", layout="mono", samples=samples_per_frame)
            sound.sample_rate = SAMPLE_RATE
            sound.pts = index * samples_per_frame
            sound.planes[0].update(tone)
            for packet in audio.encode(sound):
                container.mux(primed.shift(packet))
        for packet in video.encode(None):
            container.mux(packet)
        for packet in audio.encode(None):
            container.mux(primed.shift(packet))


@attrs.define
class _Priming:
    """
    AAC's encoder stamps its first packet before zero (by its priming
    samples), and the muxer would then move every time stamp up by as
    much and fill the time before the first picture with padding: the
    file would no longer start with its keyframe right after the PAT and
    PMT.  The audio is moved later instead, by that first packet's lead
    (1024 samples, 21 ms, for AAC; nothing for MP2).
    """

    offset: int | None = None

    def shift(self, packet):
        if self.offset is None:
            self.offset = max(0, -packet.pts)
        packet.pts += self.offset
        packet.dts += self.offset
        return packet


def _fill_plane(plane, data: bytes, width: int) -> None:
    """Copy tightly packed rows into a plane whose rows may be padded."""
    stride = plane.line_size
    if stride == width:
        plane.update(data)
        return
    rows = len(data) // width
    padded = bytearray(stride * rows)
    for row in range(rows):
        padded[row * stride : row * stride + width] = data[row * width : (row + 1) * width]
    plane.update(bytes(padded))


def _background() -> tuple[bytes, bytes, bytes]:
    """
    The still part of the picture: colour bars over the top two thirds,
    a black band below with a grey box where the clock runs.
    """
    bar_width = WIDTH // len(_BARS)
    bars_height = HEIGHT * 2 // 3
    planes = []
    for component, (width, height) in enumerate(
        [(WIDTH, HEIGHT), (WIDTH // 2, HEIGHT // 2), (WIDTH // 2, HEIGHT // 2)]
    ):
        sub = WIDTH // width
        bar_row = bytes(
            _BARS[min(x * sub // bar_width, len(_BARS) - 1)][component] for x in range(width)
        )
        black = bytes([16 if component == 0 else 128]) * width
        split = bars_height // sub
        planes.append(bar_row * split + black * (height - split))
    return planes[0], planes[1], planes[2]


def _draw_clock(luma: bytearray, index: int) -> None:
    """Draw C{MM:SS:FF}, the frame's time in the file, in white."""
    seconds, frame = divmod(index, FPS)
    text = f"{seconds // 60:02d}:{seconds % 60:02d}:{frame:02d}"
    white = bytes([235]) * _SCALE
    for position, char in enumerate(text):
        left = _CLOCK_X + position * 4 * _SCALE
        for row, cells in enumerate(_FONT[char]):
            for column, cell in enumerate(cells):
                if cell != "1":
                    continue
                x = left + column * _SCALE
                for y in range(_CLOCK_Y + row * _SCALE, _CLOCK_Y + (row + 1) * _SCALE):
                    luma[y * WIDTH + x : y * WIDTH + x + _SCALE] = white


def _tone_samples() -> bytes:
    """One video frame's worth of a sine tone, 16-bit mono (see L{TONE_HZ})."""
    count = SAMPLE_RATE // FPS
    return b"".join(
        int(8000 * math.sin(2 * math.pi * TONE_HZ * n / SAMPLE_RATE)).to_bytes(
            2, "little", signed=True
        )
        for n in range(count)
    )


def nulls_to_data(data: bytes) -> bytes:
    """
    C{data} with each null packet replaced by a synthetic data packet.
    They carry seq 0 and no tag here: the engine stamps them as it serves
    them.
    """
    template = synthetic.data_packet(0, b"\0\0\0\0", 0.0)
    out = bytearray(data)
    replaced = 0
    for offset in range(0, len(out), PACKET_SIZE):
        if (out[offset + 1] & 0x1F) << 8 | out[offset + 2] == NULL_PID:
            out[offset : offset + PACKET_SIZE] = template
            replaced += 1
    if not replaced:
        raise ValueError("the muxer left no null packets to carry the data packets")
    return bytes(out)


def main(argv: list[str]) -> Path:
    """
    C{python -m acestream_proxy.testing.demo_media [--coding NAME] [FILE]}:
    make the demo's broadcast in another coding, or at another place, for
    the demo's C{--media FILE} or the simulated engine's C{--source FILE};
    an existing file is kept.  Prints the file's path.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m acestream_proxy.testing.demo_media",
        description="Make the demo's MPEG-TS broadcast (once) and print its path.",
    )
    parser.add_argument(
        "--coding",
        choices=sorted(CODINGS),
        default=DEFAULT.name,
        help=f"h264: H.264 and AAC (browsers, VLC, mpv); mpeg2: MPEG-2 video and MP2 "
        f"[default: {DEFAULT.name}]",
    )
    parser.add_argument(
        "file",
        nargs="?",
        type=Path,
        metavar="FILE",
        help="where to make it [default: its name in $XDG_CACHE_HOME/aceproxy "
        "or ~/.cache/aceproxy]",
    )
    args = parser.parse_args(argv)
    path = demo_file(args.file, CODINGS[args.coding])
    print(path)
    return path


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
