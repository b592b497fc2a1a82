"""Transport security of servers and clients: TLS files, loopback addresses, client tokens.

PEM files are read and checked, loopback addresses recognised, and a client's credential
(token) taken from a flag, a file or the environment.

The gRPC credentials are built where gRPC lives (``server/grpc_app.py``, ``edge/uplink.py``);
this module only turns paths into checked PEM bytes, with a ConfigError naming the flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

LOOPBACK_NAMES = ("localhost",)
"""Host names treated as loopback besides the 127.0.0.0/8 and ::1 addresses."""


def read_pem(path: str | Path, flag: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming ``flag`` if it is missing or not PEM."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {str(p)!r} cannot be read: {exc}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {str(p)!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def host_of(address: str) -> str:
    """The host part of ``HOST:PORT`` (``[::1]:50051`` -> ``::1``)."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def check_address(address: str, what: str, *, listen: bool = False) -> str:
    """``address`` if it is ``HOST:PORT`` with a port in 1..65535 (0 too when ``listen``).

    Raises:
        ConfigError: naming ``what`` (the flag or key) and the expected form.
    """
    host, sep, port = address.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ConfigError(
            f"{what} must be HOST:PORT with a port in {lowest}..65535, got {address!r}"
        )
    return address


def is_loopback(address: str) -> bool:
    """True when ``HOST:PORT`` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    host = host_of(address)
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key, and the CA that client certificates must chain to."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None
    """Set: mutual TLS (every client must present a certificate signed by this CA)."""

    @classmethod
    def from_paths(cls, cert: str, key: str, client_ca: str = "") -> ServerTls | None:
        """Read the files (None when no TLS is configured); ConfigError on a half setting."""
        if not cert and not key:
            if client_ca:
                raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not cert or not key:
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        return cls(
            cert=read_pem(cert, "--tls-cert"),
            key=read_pem(key, "--tls-key"),
            client_ca=read_pem(client_ca, "--tls-client-ca") if client_ca else None,
        )


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (the server's CA) and, for mutual TLS, what it presents."""

    ca: bytes | None = None
    """PEM of the CA the server's certificate must chain to (None = the system roots)."""
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_paths(cls, ca: str = "", cert: str = "", key: str = "") -> ClientTls | None:
        """Read the files (None when no TLS flag is given); ConfigError on a half setting."""
        if not (ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
        return cls(
            ca=read_pem(ca, "--tls-ca") if ca else None,
            cert=read_pem(cert, "--tls-cert") if cert else None,
            key=read_pem(key, "--tls-key") if key else None,
        )


def add_client_tls_flags(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key`` for a command that connects to a server."""
    parser.add_argument("--tls-ca", dest="tls_ca", help="PEM CA of the server's certificate (TLS)")
    parser.add_argument("--tls-cert", dest="tls_cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", dest="tls_key", help="PEM key of --tls-cert")


def client_tls_from_args(args: argparse.Namespace) -> ClientTls | None:
    """The :class:`ClientTls` of :func:`add_client_tls_flags` (None without TLS flags)."""
    return ClientTls.from_paths(args.tls_ca or "", args.tls_cert or "", args.tls_key or "")


TOKEN_ENV = "LATENTEDGE_TOKEN"
"""Environment variable a client reads its token from when no flag gives one."""


def add_client_token_flags(parser: argparse.ArgumentParser) -> None:
    """``--token`` and ``--token-file`` (else ``$LATENTEDGE_TOKEN``) for a client command."""
    parser.add_argument("--token", help=f"credential for the server (else ${TOKEN_ENV})")
    parser.add_argument("--token-file", dest="token_file", help="file holding the credential")


def read_token(token: str = "", token_file: str = "") -> str:
    """The client's token: ``token``, else the content of ``token_file``, else the environment.

    Raises:
        ConfigError: both given, an unreadable or empty file, or a token with whitespace inside.
    """
    if token and token_file:
        raise ConfigError("give --token or --token-file, not both")
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--token-file {token_file!r} cannot be read: {exc}") from exc
        if not text:
            raise ConfigError(f"--token-file {token_file!r} is empty")
        token = text
    token = (token or os.environ.get(TOKEN_ENV, "")).strip()
    if any(ch.isspace() for ch in token) or not token.isascii():
        raise ConfigError("the token must be one word of ASCII characters (as issued)")
    return token


def client_token_from_args(args: argparse.Namespace) -> str:
    """The token of :func:`add_client_token_flags` ("" when none is given anywhere)."""
    return read_token(args.token or "", args.token_file or "")
