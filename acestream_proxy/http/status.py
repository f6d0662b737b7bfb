"""
The status page: C{GET /} is a static page whose script polls
C{GET /status} (JSON) and renders engines and streams as tables, and plays
a stream in a C{<video>} element from its HLS playlist
(C{/ace/manifest.m3u8?id=KEY}) where the browser plays HLS itself.

The page is plain files shipped in the package (C{static/}), with no build
step and nothing fetched from elsewhere, served under a Content Security
Policy that allows only this origin: the page renders text it got from the
API (stream keys, engine ids) and must never be able to run any of it.

C{/status} shows what the JSON views show the caller: anyone gets this
worker's health and the engines' public fields; only an admin (see
L{ProxyWeb._is_admin}) gets the streams, since a stream key is what a
stranger needs to watch, or to find out what is being watched.
"""

from importlib.resources import files

from . import views

#: The page's own files and their types: nothing else is served from
#: C{static/}, so no path from a request ever reaches the file system.
ASSETS = {
    "index.html": b"text/html; charset=utf-8",
    "status.js": b"text/javascript; charset=utf-8",
    "status.css": b"text/css; charset=utf-8",
}

#: Only this origin's scripts, styles, fetches and media (the player's HLS
#: playlist and segments); no frames, no forms, no other base: a key or an
#: id in the JSON can never become code.  C{media-src} says outright what
#: C{default-src} already allows, so that the player cannot be pointed
#: elsewhere even if the default is widened.
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; media-src 'self'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)


def asset(request, name: str) -> bytes:
    """
    One of L{ASSETS}, read from the installed package at each request: they
    are a few kilobytes, asked for once per page load.
    """
    request.setHeader(b"Content-Type", ASSETS[name])
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-cache")
    return files(__package__).joinpath("static", name).read_bytes()


async def status_view(registry, admin: bool) -> dict:
    """
    Everything the page shows, in one answer taken at one moment: C{time}
    is the worker's clock, which the page divides byte counts by to show
    bitrates, whatever the browser's own clock says.
    """
    return {
        "admin": admin,
        "time": registry.clock.seconds(),
        "health": views.health_view(registry),
        "engines": await views.engines_view(registry, admin),
        "streams": await views.streams_view(registry, None, admin) if admin else None,
    }
