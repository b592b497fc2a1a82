"""Node and admin credentials: tokens bound to an identity, checked on every RPC.

A token reads ``le1.<token_id>.<secret>``: ``token_id`` (16 hex digits) finds the stored
record, the 256-bit ``secret`` is checked against a salted SHA-256 digest (the store never
holds the secret, so a copy of the database issues nothing). A token acts for one node id
(``latentedge token issue NODE_ID``) or is an admin token (``--admin``). Clients send it as
``authorization: Bearer <token>`` gRPC metadata.

With mutual TLS a verified client certificate can serve instead of a token: its subject
common name is the identity — ``latentedge-admin`` (:data:`ADMIN_COMMON_NAME`) is an admin,
any other CN that is a valid node id acts for that node. A token, when sent, wins over the
certificate.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from common.errors import AuthenticationError, ConfigError, PermissionDeniedError
from common.records import TokenRecord
from server.store import Store

TOKEN_PREFIX = "le1"
TOKEN_PATTERN = re.compile(r"le1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")
"""``le1.<token_id>.<secret>``; the secret is 32 random bytes, URL-safe base64."""
ADMIN_COMMON_NAME = "latentedge-admin"
"""Client-certificate CN that makes an admin under mutual TLS."""
METADATA_KEY = "authorization"
SUBJECT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Node ids (as ``server.core.NODE_ID_PATTERN``) and admin labels."""


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("ascii")).digest()


def new_token(subject: str, *, admin: bool = False) -> tuple[str, TokenRecord]:
    """A fresh token for ``subject``: its text (show once) and the record to store.

    Raises:
        ConfigError: ``subject`` is not a valid node id / label.
    """
    if not SUBJECT_PATTERN.fullmatch(subject):
        raise ConfigError(
            f"token subject {subject!r} must be a node id: 1-64 of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = TokenRecord(token_id, subject, admin, salt, _digest(salt, secret), time.time())
    return f"{TOKEN_PREFIX}.{token_id}.{secret}", record


def issue_token(store: Store, subject: str, *, admin: bool = False) -> tuple[str, TokenRecord]:
    """Make a token for ``subject`` and store its record; the text (show it once) and record."""
    text, record = new_token(subject, admin=admin)
    store.add_token(record)
    return text, record


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    subject: str
    """Node id (or admin label); empty for an open server's anonymous caller."""
    admin: bool
    via: str
    """``token:<id>``, ``certificate`` or ``open`` (no credentials required)."""

    @property
    def unrestricted(self) -> bool:
        """An admin, or anyone on an open server: may act for every node."""
        return self.admin or self.via == "open"

    def may_act_for(self, node_id: str) -> bool:
        """Admins and open servers act for anyone; a node only for itself."""
        return self.unrestricted or self.subject == node_id

    def require_node(self, node_id: str, what: str) -> None:
        """PermissionDeniedError unless this caller may act for ``node_id``."""
        if not self.may_act_for(node_id):
            raise PermissionDeniedError(
                f"{what}: the credential of node {self.subject!r} may not act for node {node_id!r}"
            )

    def require_admin(self, what: str) -> None:
        """PermissionDeniedError unless this caller is an admin (or the server is open)."""
        if not self.unrestricted:
            raise PermissionDeniedError(
                f"{what} needs an admin credential (latentedge token issue --admin); "
                f"the caller is node {self.subject!r}"
            )


OPEN = Principal(subject="", admin=False, via="open")


class Authenticator:
    """Turns an RPC's metadata (and client certificate) into a :class:`Principal`."""

    def __init__(self, store: Store, *, required: bool) -> None:
        self._store = store
        self.required = required
        """False: an open server (loopback demo), every caller is :data:`OPEN`."""

    def principal(
        self, metadata: Iterable[tuple[str, str | bytes]], common_names: Iterable[bytes] = ()
    ) -> Principal:
        """The caller of an RPC with ``metadata`` and verified certificate ``common_names``.

        Raises:
            AuthenticationError: credentials are required and missing, malformed, unknown,
                wrong or revoked.
        """
        if not self.required:
            return OPEN
        sent = [v for k, v in metadata if k == METADATA_KEY]
        if sent:
            return self._from_token(sent[0])
        for raw in common_names:
            name = raw.decode("utf-8", "replace")
            if name == ADMIN_COMMON_NAME:
                return Principal(subject=name, admin=True, via="certificate")
            if SUBJECT_PATTERN.fullmatch(name):
                return Principal(subject=name, admin=False, via="certificate")
        raise AuthenticationError(
            "this server requires a credential: pass --token, --token-file or "
            "LATENTEDGE_TOKEN (an operator makes one with `latentedge token issue NODE_ID "
            "--db DB`)"
        )

    def _from_token(self, value: str | bytes) -> Principal:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        match = TOKEN_PATTERN.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            raise AuthenticationError(
                "malformed credential: expected metadata 'authorization: Bearer le1.<id>.<secret>'"
            )
        token_id, secret = match.groups()
        record = self._store.find_token(token_id)
        if record is None or not hmac.compare_digest(record.digest, _digest(record.salt, secret)):
            raise AuthenticationError(f"unknown or wrong token (id {token_id})")
        if record.revoked_at is not None:
            raise AuthenticationError(f"token {token_id} was revoked")
        return Principal(subject=record.subject, admin=record.admin, via=f"token:{token_id}")
