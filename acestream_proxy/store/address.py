"""
Where Redis is, as a C{redis://}, C{rediss://} or C{unix://} URL says, and
how to reach it: an endpoint of the store's reactor, with TLS for
C{rediss}.  The password a URL carries is kept out of every text.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


@attrs.frozen
class RedisAddress:
    """
    Where Redis is and how to log in: C{redis://[[user]:password@]host[:port][/db]},
    C{rediss://...} for TLS (verified against the certificates in
    C{?ssl_ca_certs=PATH}, else against the system's), or
    C{unix:///path[?db=N]}.  A user name and password are percent-decoded;
    a user part with no colon is the password (C{redis://password@host}),
    since Redis cannot log in with a user name alone.

    The password is left out of the repr and of L{describe}, so that no log
    line, health report or error shows it.
    """

    host: str | None
    port: int
    path: str | None
    db: int
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool = False
    ca_certs: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            return cls(None, 0, parts.path, db)
        username, password = None, None
        if "@" in parts.netloc:
            user, colon, secret = parts.netloc.rpartition("@")[0].partition(":")
            if colon:
                username, password = unquote(user) or None, unquote(secret)
            else:
                password = unquote(user)
        ca_certs = parse_qs(parts.query).get("ssl_ca_certs", [None])[0]
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or 6379,
            None,
            int(parts.path.strip("/") or 0),
            username=username,
            password=password,
            tls=parts.scheme == "rediss",
            ca_certs=ca_certs,
        )

    def endpoint(self, reactor, timeout: float) -> IStreamClientEndpoint:
        """
        Where to connect, on C{reactor}.  A host name may resolve to IPv6 as
        well as IPv4 addresses: L{HostnameEndpoint} tries them all.  With
        TLS the certificate must be valid for the host as written.
        """
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if not self.tls:
            return endpoint
        # Imported for rediss only: pyOpenSSL is loaded when TLS is used.
        from twisted.internet.ssl import optionsForClientTLS

        return wrapClientTLS(
            optionsForClientTLS(self.host, trustRoot=self._trust_root()), endpoint, clock=reactor
        )

    def _trust_root(self):
        """
        The certificates of C{ssl_ca_certs}, or L{None} for the system's.
        """
        if self.ca_certs is None:
            return None
        from twisted.internet.ssl import Certificate, trustRootFromCertificates

        try:
            with open(self.ca_certs, "rb") as f:
                found = _PEM_CERTIFICATE.findall(f.read())
        except OSError as e:
            raise ValueError(f"redis: cannot read ssl_ca_certs {self.ca_certs}: {e.strerror}")
        if not found:
            raise ValueError(f"redis: no certificate in ssl_ca_certs {self.ca_certs}")
        return trustRootFromCertificates([Certificate.loadPEM(pem) for pem in found])

    def describe(self) -> str:
        """
        The address for logs and reports: never the password.
        """
        if self.path is not None:
            return self.path
        user = f"{self.username}@" if self.username else ""
        tls = " (TLS)" if self.tls else ""
        return f"{user}{self.host}:{self.port}/{self.db}{tls}"
