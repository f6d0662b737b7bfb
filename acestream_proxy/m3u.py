"""
C{aceproxy-m3u}: turn a playlist that points at AceStream (C{acestream://}
links, engine URLs) into one that points at this proxy, so that every
player of a channel shares one engine session.

Only the links change.  The rest of the file is kept byte for byte, line
endings and bytes in any encoding included, since playlists come from
everywhere and a tool that "cleans up" one can break the player that reads
it.  So the work is done on bytes, and only standard library modules are
imported: the script starts fast and needs neither Twisted nor a reactor.
"""

import argparse
import re
import sys
from urllib.parse import urlsplit

DEFAULT_BASE = "http://127.0.0.1:8000"

# A URL ends at white space (line endings included), quotes and angle
# brackets, as it does in M3U lines and their attributes.
_URL_CHAR = rb"[^\s\"'<>]"
_HEX40 = rb"[0-9A-Fa-f]{40}(?![0-9A-Fa-f])"

# One pass over the file, so that a URL just written is never looked at again.
_LINK = re.compile(
    rb"(?i:acestream)://(?P<acestream>" + _HEX40 + rb")"
    rb"|(?i:https?)://[^\s\"'<>/?#]+(?:"
    rb"/ace/getstream\?(?P<query>" + _URL_CHAR + rb"*)"
    rb"|/pid/(?P<pid>" + _HEX40 + rb")(?:[/?#]" + _URL_CHAR + rb"*)?"
    rb")"
)
_ID = re.compile(_HEX40)


def rewrite(data: bytes, base: bytes) -> bytes:
    """
    C{data} with each AceStream link replaced by its URL on the proxy at
    C{base} (C{scheme://host[:port][/prefix]}, no trailing slash):

    - C{acestream://<id>} and an engine's C{http://host:port/pid/<id>/...}
      become C{base/ace/getstream?id=<id>};
    - an engine's C{http://host:port/ace/getstream?...} becomes
      C{base/ace/getstream?id=<id>} or C{?infohash=<infohash>}, after the
      parameter it carries; its other parameters (C{pid}, ...) are the
      engine's business and are dropped.

    A C{getstream} URL without exactly one valid C{id} or C{infohash} is
    left as it is: the proxy would refuse it anyway.
    """
    prefix = base + b"/ace/getstream?"

    def replace(match: re.Match) -> bytes:
        content = match["acestream"] or match["pid"]
        if content is not None:
            return prefix + b"id=" + content
        found = []
        for field in match["query"].split(b"#", 1)[0].split(b"&"):
            name, equals, value = field.partition(b"=")
            if equals and name in (b"id", b"infohash"):
                found.append((name, value))
        if len(found) != 1 or not _ID.fullmatch(found[0][1]):
            return match[0]
        name, value = found[0]
        return prefix + name + b"=" + value

    return _LINK.sub(replace, data)


def checked_base(base: str) -> bytes | None:
    """
    C{base} as the prefix of the URLs written, without a trailing slash, or
    L{None} if it is not an http(s) URL with a host (and at most a path).
    """
    if any(c.isspace() or not c.isprintable() for c in base) or not base.isascii():
        return None
    try:
        parts = urlsplit(base)
        parts.port
    except ValueError:
        return None
    if (
        parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
        or "?" in base
        or "#" in base
        or any(c in base for c in "\"'<>")
    ):
        return None
    return base.rstrip("/").encode("ascii")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aceproxy-m3u",
        description=(
            "Rewrite the acestream:// links and AceStream engine URLs of an M3U"
            " playlist into URLs of an aceproxy, keeping every other byte."
            " The result goes to standard output."
        ),
    )
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE,
        help=f"the proxy's URL as players reach it [default: {DEFAULT_BASE}]",
    )
    parser.add_argument(
        "playlist",
        nargs="?",
        default="-",
        help="the playlist to read; - or nothing for standard input",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    The console script.  A mistake is one line on standard error: exit
    status 2 for a wrong argument, 1 for a file that cannot be read or a
    result that cannot be written.
    """
    args = _parser().parse_args(argv)
    base = checked_base(args.base)
    if base is None:
        print(
            f"aceproxy-m3u: --base: not an http(s) URL with a host: {args.base!r}",
            file=sys.stderr,
        )
        return 2
    try:
        if args.playlist == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.playlist, "rb") as f:
                data = f.read()
    except OSError as err:
        print(
            f"aceproxy-m3u: cannot read {args.playlist}: {err.strerror or err}",
            file=sys.stderr,
        )
        return 1
    try:
        sys.stdout.buffer.write(rewrite(data, base))
        sys.stdout.buffer.flush()
    except OSError as err:
        print(f"aceproxy-m3u: cannot write: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
