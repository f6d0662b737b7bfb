"""
C{python -m acestream_proxy.testing.demo} (C{make demo}): the proxy in front of a
simulated engine, both in this one process, so that a newcomer can point a
player at a working stream without installing an AceStream engine.

The engine plays a test picture with a running clock and a tone
(L{demo_media}), made with PyAV at the first run and cached, so that the
newcomer sees a picture; its synthetic data packets keep the stream
checkable.  PyAV is therefore in the C{demo} extra, which C{make demo}
installs and C{make run} does not.

Both listen through endpoints and the actual ports are read back, so that
C{--listen tcp:0} and C{--engine-port 0} work and the printed URL is always
the one to use.  Ctrl-C stops the proxy first (its players get a clean end
and the engine is told to stop), then the engine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.server import Site

from ..config import Config, ConfigError, build, engine_from_url
from ..http.routes import make_site
from ..service import make_service
from . import demo_media
from .engine import SimulatedEngine
from .source import SourceError, TsSource, load

#: The content id the printed URL asks for; any 40 hex digits would do.
DEMO_ID = "ace0" * 10
DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"
DEFAULT_ENGINE_PORT = 6878
LOOPBACK = "127.0.0.1"

log = Logger(namespace="demo")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m acestream_proxy.testing.demo",
        description="Run the proxy against a simulated AceStream engine, "
        "in one process, until Ctrl-C.",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ENDPOINT",
        help=f"endpoint the proxy serves players on [default: {DEFAULT_LISTEN}]",
    )
    parser.add_argument(
        "--engine-port",
        type=_port_number,
        default=DEFAULT_ENGINE_PORT,
        metavar="N",
        help="port of the simulated engine on 127.0.0.1; 0 for any free port "
        f"[default: {DEFAULT_ENGINE_PORT}, or a free port if taken]",
    )
    parser.add_argument(
        "--media",
        type=Path,
        default=None,
        metavar="FILE",
        help="the MPEG-TS file the engine plays; made there if missing "
        f"[default: {demo_media.FILE_NAME} in $XDG_CACHE_HOME/aceproxy or ~/.cache/aceproxy]",
    )
    args = parser.parse_args(argv)
    try:
        # Validated before anything listens, so a typo costs one line.
        build({}, {"listen": args.listen})
    except ConfigError as err:
        parser.error(str(err))
    return args


def _port_number(text: str) -> int:
    """argparse type: a TCP port, 0 meaning any free one."""
    try:
        number = int(text)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return number


async def listen_engine(reactor, engine: SimulatedEngine, port: int) -> IListeningPort:
    """
    Listen for the engine on loopback; a taken port falls back to a free
    one, since a real engine often occupies the usual 6878.
    """
    site = Site(engine.resource())
    try:
        return await TCP4ServerEndpoint(reactor, port, interface=LOOPBACK).listen(site)
    except CannotListenError as err:
        if port == 0:
            raise
        log.warn(
            "port {port} is taken ({why}); the simulated engine takes a free port",
            port=port,
            why=err.socketError,
        )
        return await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(site)


def load_media(path: Path | None) -> TsSource:
    """
    The broadcast to play: made at the first run (a few seconds), then read
    from the cache.  A file that cannot be made or read stops the demo with
    one line.
    """
    if path is None:
        path = demo_media.cache_dir() / demo_media.FILE_NAME
    if not path.exists():
        try:
            import av  # noqa: F401  (only to say what is missing)
        except ImportError:
            raise SystemExit(
                "demo: the demo's picture is made with PyAV, which is missing; "
                "install it with: pip install '.[demo]' (make demo does)"
            )
        print(f"demo: making the demo broadcast in {path} (once)", file=sys.stderr)
    try:
        path = demo_media.demo_file(path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"demo: cannot make {path}: {err}")
    try:
        source = load(path)
    except SourceError as err:
        raise SystemExit(f"demo: {err}")
    if source.bitrate is None:
        raise SystemExit(f"demo: {path} carries too few PCRs to tell its bitrate")
    return source


def proxy_config(listen: str, engine_port: int) -> Config:
    """The proxy's configuration: defaults, one engine, the simulated one."""
    engine = engine_from_url(f"http://{LOOPBACK}:{engine_port}", id="simulated")
    return build({}, {"listen": listen, "engines": [engine]})


def http_base(port: IListeningPort) -> str:
    """
    Where a player on this machine reaches C{port}: a wildcard address is
    spelled as loopback, since it cannot be connected to as such.
    """
    address = port.getHost()
    host = getattr(address, "host", LOOPBACK)
    if host in ("0.0.0.0", "::", ""):
        host = LOOPBACK
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{address.port}"


def print_banner(out: TextIO, proxy: str, engine: str) -> None:
    """
    What to paste, printed (not logged) so that it stands out from the log
    lines and survives a pipe unchanged.
    """
    url = f"{proxy}/ace/getstream?id={DEMO_ID}"
    lines = [
        "",
        "The proxy is ready. Stream URL:",
        "",
        f"    {url}",
        "",
        "Watch it (colour bars, a running clock and a 1 kHz tone, looped):",
        f"    vlc {url}",
        f"    mpv {url}",
        "Inspect the proxy and the engine:",
        f"    curl {proxy}/streams",
        f"    curl {proxy}/engines",
        f"    curl {engine}/sim/state",
        "Press Ctrl-C to stop.",
        "",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()


@attrs.define(eq=False)
class Demo:
    """The running pieces, and how to stop them in the right order."""

    engine: SimulatedEngine
    engine_port: IListeningPort
    service: object = None
    proxy_port: IListeningPort | None = None

    async def stop(self) -> None:
        """
        Proxy first, while the engine still answers its stop command; the
        engine's remaining connections are cut last.
        """
        log.info("stopping the demo")
        if self.service is not None and self.service.running:
            await self.service.stopService()
        if self.proxy_port is not None:
            await self.proxy_port.stopListening()
        self.engine.drop_playback()
        await self.engine_port.stopListening()
        log.info("demo stopped")


async def start(reactor, args: argparse.Namespace, demo: Demo) -> None:
    """Start the proxy in front of the already listening engine."""
    config = proxy_config(args.listen, demo.engine_port.getHost().port)
    demo.service = make_service(config, reactor, listen=False)
    demo.service.startService()
    try:
        demo.proxy_port = await serverFromString(reactor, config.listen).listen(
            make_site(demo.service.getServiceNamed("streams"), config)
        )
    except CannotListenError as err:
        log.error("the proxy cannot listen on {listen}: {why}", listen=config.listen, why=err)
        raise SystemExit(1)


async def main(reactor, args: argparse.Namespace, source: TsSource) -> None:
    """Listen, print where, and run until the reactor is stopped."""
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    engine = SimulatedEngine(reactor, bitrate=source.bitrate, source=source)
    demo = Demo(engine, await listen_engine(reactor, engine, args.engine_port))
    # A shutdown trigger's Deferred is waited for, so Ctrl-C lets the
    # proxy wind down before the process exits.
    reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(demo.stop()))
    await start(reactor, args, demo)
    print_banner(sys.stdout, http_base(demo.proxy_port), http_base(demo.engine_port))
    # Never fires: the demo runs until a signal stops the reactor.
    await Deferred()


def run(argv: list[str]) -> None:
    """
    Parse the command line and load (or make) the broadcast before the
    reactor runs, so that either failing is one line; then run the demo.
    """
    args = parse_args(argv)
    react(main, (args, load_media(args.media)))


if __name__ == "__main__":
    run(sys.argv[1:])
