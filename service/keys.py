"""API keys with scopes, stored as sha256 digests only.

``MQSA_API_KEYS`` holds comma-separated entries ``SCOPES:SHA256``: SCOPES is one or
more of ``read``, ``write``, ``admin`` joined by ``+``, SHA256 the 64 hex digits of
the key's sha256, e.g. ``read:9f86d0...,read+write:5e8848...,admin:6b3a55...``.
``mqsa keys new --scopes read,write`` makes a random key and prints its entry.

What each scope opens (each route declares its scope; ``/healthz`` and ``/readyz``
are always open):

    read    POST /recommend, GET /model; the API docs unless MQSA_PUBLIC_DOCS
    write   POST /events
    admin   POST /admin/reload, GET and PUT /admin/traffic; GET /metrics unless MQSA_PUBLIC_METRICS

A request carries its key in ``X-API-Key`` or ``Authorization: Bearer``. The key is
hashed and compared with every stored digest with ``hmac.compare_digest`` (constant
time), so neither the keys nor their digests' prefixes leak through timing. With no
keys configured (development only; production refuses to start without), every
route is open.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


@dataclass(frozen=True)
class StoredKey:
    """One configured key: what it may do, and its sha256 (hex), never the key itself."""

    scopes: frozenset[Scope]
    sha256: str

    def __repr__(self) -> str:  # the digest is not the key, but there is no need to print it
        return f"StoredKey(scopes={sorted(self.scopes)}, sha256=...)"


def digest(key: str) -> str:
    """The hex sha256 of a key, as stored in ``MQSA_API_KEYS``."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key: 32 bytes from the OS's generator, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def entry(key: str, scopes: Iterable[Scope | str]) -> str:
    """The ``MQSA_API_KEYS`` entry of a key with these scopes."""
    return "+".join(sorted(Scope(s) for s in scopes)) + ":" + digest(key)


def parse_entries(text: str) -> list[StoredKey]:
    """Parse ``MQSA_API_KEYS``.

    Raises:
        ValueError: naming the entry's position and what is wrong, never its text (it may
            be a key pasted where its digest belongs).
    """
    keys = []
    for n, raw in enumerate((e.strip() for e in text.split(",")), start=1):
        if not raw:
            continue
        scopes, sep, hexdigest = raw.rpartition(":")
        names = scopes.split("+") if sep else []
        if not names or any(name not in Scope.__members__.values() for name in names):
            raise ValueError(
                f"entry {n} is not SCOPES:SHA256 with SCOPES from read, write, admin joined by '+' "
                "(make one with `mqsa keys new --scopes read`)"
            )
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest.lower()):
            raise ValueError(f"entry {n}: the part after ':' must be the key's sha256, 64 hex digits")
        keys.append(StoredKey(frozenset(Scope(s) for s in names), hexdigest.lower()))
    return keys


def scopes_of(offered: str, keys: Iterable[StoredKey]) -> frozenset[Scope]:
    """The scopes of the configured keys ``offered`` matches (empty when it matches none).

    Every stored digest is compared, whether or not an earlier one matched, each in
    constant time.
    """
    wanted = digest(offered).encode()
    granted: set[Scope] = set()
    for key in keys:
        if hmac.compare_digest(wanted, key.sha256.encode()):
            granted |= key.scopes
    return frozenset(granted)
