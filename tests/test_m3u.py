"""
Tests of the C{aceproxy-m3u} console script, run as a subprocess on real
files: links rewritten, every other byte (line endings, bytes that are not
UTF-8) kept.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from acestream_proxy.m3u import checked_base, rewrite

from .support import HASHES

SCRIPT = pathlib.Path(sys.executable).parent / "aceproxy-m3u"
A, B, C, D, E = (h.encode() for h in HASHES[:5])
UPPER = b"ABCDEF0123456789ABCDEF0123456789ABCDEF01"
BASE = b"http://tv.example:8000"

#: A playlist with mixed line endings (CRLF, LF, a lone CR, none at the end),
#: bytes that are not UTF-8, every kind of link, and lines to leave alone.
SOURCE = [
    (b'#EXTM3U x-tvg-url="http://epg.example/guide.xml"\r\n', None),
    (b'#EXTINF:-1 tvg-id="one" group-title="Sport",Sp\xe9rt \xff\xfe\r\n', None),
    (b"acestream://%s\r\n" % A, b"%s/ace/getstream?id=%s\r\n" % (BASE, A)),
    (b"#EXTINF:-1,Two\n", None),
    (
        b"http://192.168.1.10:6878/ace/getstream?id=%s&pid=7\n" % B,
        b"%s/ace/getstream?id=%s\n" % (BASE, B),
    ),
    (b"#EXTINF:-1,Three\r\n", None),
    (
        b"HTTP://engine:6878/ace/getstream?pid=1&infohash=%s\r\n" % UPPER,
        b"%s/ace/getstream?infohash=%s\r\n" % (BASE, UPPER),
    ),
    (b"#EXTINF:-1,Four\n", None),
    (
        b"http://127.0.0.1:6878/pid/%s/stream.mp4\r\n" % C,
        b"%s/ace/getstream?id=%s\r\n" % (BASE, C),
    ),
    (b"http://[::1]:6878/pid/%s\n" % D, b"%s/ace/getstream?id=%s\n" % (BASE, D)),
    (b"#EXTINF:-1,Other\n", None),
    (b"http://example.com/live/stream.m3u8\n", None),
    (b"http://127.0.0.1:6878/ace/getstream?id=nothex\r\n", None),
    (b"http://127.0.0.1:6878/ace/getstream?id=%s&infohash=%s\n" % (A, B), None),
    (b"http://127.0.0.1:6878/ace/manifest.m3u8?id=%s\n" % A, None),
    (b"acestream://%s0\r\n" % A, None),
    (b"acestream://short\r", None),
    (b"   \t\r\n", None),
    (b"\n", None),
    (
        b"# see acestream://%s or \"acestream://%s\" here\n" % (E, A),
        b"# see %s/ace/getstream?id=%s or \"%s/ace/getstream?id=%s\" here\n" % (BASE, E, BASE, A),
    ),
    (b"last line without an ending \x80", None),
]
ORIGINAL = b"".join(line for line, _ in SOURCE)
REWRITTEN = b"".join(line if new is None else new for line, new in SOURCE)


def run(*arguments, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *arguments], input=stdin, capture_output=True, timeout=60
    )


def test_script_is_installed():
    assert SCRIPT.exists(), "make .venv/.installed installs aceproxy-m3u"


def test_rewrites_links_and_keeps_every_other_byte(tmp_path):
    path = tmp_path / "in.m3u"
    path.write_bytes(ORIGINAL)
    done = run("--base", BASE.decode(), str(path))
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == REWRITTEN
    # Line by line, endings included: only the link lines changed.
    assert done.stdout.splitlines(keepends=True) == [
        line if new is None else new for line, new in SOURCE
    ]
    assert path.read_bytes() == ORIGINAL


def test_reads_standard_input_and_defaults_the_base(tmp_path):
    done = run(stdin=ORIGINAL)
    assert done.returncode == 0
    assert done.stdout == REWRITTEN.replace(BASE, b"http://127.0.0.1:8000")
    assert run("-", "--base", "https://h.example/tv/", stdin=ORIGINAL).stdout == (
        REWRITTEN.replace(BASE, b"https://h.example/tv")
    )


def test_a_rewritten_playlist_stays_as_it_is(tmp_path):
    path = tmp_path / "out.m3u"
    path.write_bytes(REWRITTEN)
    assert run("--base", BASE.decode(), str(path)).stdout == REWRITTEN


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable"])
def test_unreadable_file_is_one_line_and_status_1(tmp_path, kind):
    path = tmp_path / "list.m3u"
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_bytes(ORIGINAL)
        path.chmod(0)
    done = run(str(path))
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.startswith(b"aceproxy-m3u: cannot read %s: " % str(path).encode())
    assert done.stderr.count(b"\n") == 1 and done.stderr.endswith(b"\n")


@pytest.mark.parametrize(
    "base",
    ["ftp://h", "h.example:8000", "http://", "http://h/?x=1", "http://a@h", "http://h:99999"],
)
def test_bad_base_is_refused(tmp_path, base):
    assert checked_base(base) is None
    done = run("--base", base, stdin=ORIGINAL)
    assert done.returncode == 2
    assert done.stdout == b""
    assert done.stderr.count(b"\n") == 1 and b"--base" in done.stderr


def test_rewrite_in_process():
    assert rewrite(ORIGINAL, BASE) == REWRITTEN
    assert rewrite(b"", BASE) == b""
