"""API keys: who may call the HTTP API, and for which service.

The keys file ([auth] keys_file) is TOML, one table per key::

    [keys.trainer]
    sha256 = "<hex SHA-256 of the key>"   # or: key = "<the key itself>" (discouraged)
    service = "training"                  # the service this key may act for

    [keys.ops]
    sha256 = "..."
    admin = true                          # may act for every service

    [keys.nightly]
    sha256 = "..."
    service = "etl"
    queue = "batch"                       # its requests count against this queue

The table name (``trainer``, ``ops``) names the key in logs, so the key itself
never has to be logged. Storing only the digest means a leaked keys file does not
leak the keys; `hash_key` (or ``printf %s "$KEY" | sha256sum``) makes the digest.

A presented key is hashed and looked up by digest. Because every stored key is a
digest, the lookup never compares secret material directly, and the final match
is confirmed with `hmac.compare_digest`, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from agent.config import did_you_mean
from agent.config_checks import ConfigError

_log = logging.getLogger(__name__)

ENTRY_KEYS: Final = ("sha256", "key", "service", "admin", "queue")
# A queue name, as coordinator/queues.py QueueSpec accepts it.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class ApiKeyError(ConfigError):
    """The API keys file is missing, malformed or ambiguous; the message says where."""


@dataclass(frozen=True)
class ApiKey:
    """One authenticated identity: the entry's name and what it may act for."""

    # The entry's table name in the keys file ([keys.<name>]); safe to log.
    name: str
    # The service this key may allocate, renew and release for; None for an
    # admin key that names no service of its own.
    service: str | None
    # An admin key may act for every service.
    admin: bool
    # The queue this key's requests count against (SPEC "Sharing the fleet"); None:
    # the queue its request's service is mapped to ([queues.<name>] services), else default.
    queue: str | None = None

    def may_act_for(self, service_name: str) -> bool:
        """Return True if this key may act on behalf of `service_name`."""
        return self.admin or self.service == service_name


class HeaderSource(Protocol):
    """Anything with ``items()`` of (name, value) pairs: a dict, or Werkzeug/Quart ``Headers``."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def hash_key(key: str) -> str:
    """Return the lowercase hex SHA-256 digest of `key` (UTF-8), as the keys file's ``sha256`` expects."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def extract_presented_key(headers: HeaderSource, header_name: str) -> str | None:
    """Return the key a request presents, or None if it presents none.

    Looks for `header_name` (e.g. X-API-Key) and for ``Authorization: Bearer <key>``;
    header names and the Bearer scheme are matched case-insensitively. When both
    are present the named header wins. Surrounding whitespace is stripped; an
    empty value counts as no key.
    """
    wanted = header_name.lower()
    named: str | None = None
    bearer: str | None = None
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == wanted and named is None:
            named = value.strip()
        elif lowered == "authorization" and bearer is None:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                bearer = token.strip()
    return named or bearer or None


class ApiKeyring:
    """The keys this agent accepts, indexed by SHA-256 digest."""

    def __init__(self, keys_by_digest: Mapping[str, ApiKey]) -> None:
        # Digests are stored lowercase, as hash_key produces them; each entry keeps
        # its stored digest so `authenticate` can confirm the match against it.
        self._by_digest = {digest.lower(): (digest.lower(), key) for digest, key in keys_by_digest.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def load(cls, path: Path) -> ApiKeyring:
        """Return the keyring read from the TOML keys file at `path`.

        Raises ApiKeyError when the file is missing or unreadable, is not TOML,
        has unknown keys, defines no keys, has an entry with neither or both of
        sha256 and key, an entry with neither service nor admin = true, or two
        entries with the same key.
        """
        try:
            with path.open("rb") as stream:
                document = tomllib.load(stream)
        except FileNotFoundError:
            raise ApiKeyError(f"API keys file {path} ([auth] keys_file) does not exist") from None
        except OSError as error:
            raise ApiKeyError(f"cannot read API keys file {path}: {error.strerror or error}") from None
        except tomllib.TOMLDecodeError as error:
            raise ApiKeyError(f"{path}: not valid TOML: {error}") from None
        return cls(_parse_document(document, path))

    def reload(self, path: Path) -> int:
        """Replace the keys with those of the file at `path` (SIGHUP); return how many there are now.

        Raises ApiKeyError, as `load` does, and then keeps the keys in force: a
        botched edit must not lock every client out. The swap is one assignment,
        so a concurrent `authenticate` sees the old keys or the new ones.
        """
        self._by_digest = ApiKeyring.load(path)._by_digest
        return len(self._by_digest)

    def queues(self) -> set[str]:
        """The queues the keys name (to warn of one the configuration does not declare)."""
        return {key.queue for _, key in self._by_digest.values() if key.queue is not None}

    def authenticate(self, presented: str) -> ApiKey | None:
        """Return the ApiKey that `presented` is, or None if it is no known key."""
        if not presented:
            return None
        digest = hash_key(presented)
        found = self._by_digest.get(digest)
        if found is None:
            return None
        # The dict lookup compares digests, never keys: its timing could at most
        # hint at a digest the caller already knows. The match itself is then
        # confirmed in constant time, so no secret-dependent comparison decides.
        stored_digest, key = found
        return key if hmac.compare_digest(stored_digest, digest) else None


def _parse_document(document: Mapping[str, Any], path: Path) -> dict[str, ApiKey]:
    for top_level in document:
        if top_level != "keys":
            raise ApiKeyError(
                f"{path}: unknown top-level key {top_level!r}; entries go in [keys.<name>] tables"
            )
    entries = document.get("keys", {})
    if not isinstance(entries, dict) or not entries:
        raise ApiKeyError(f"{path}: defines no keys; add at least one [keys.<name>] table")
    by_digest: dict[str, ApiKey] = {}
    names_by_digest: dict[str, str] = {}
    for name, entry in entries.items():
        where = f"{path}: [keys.{name}]"
        if not isinstance(entry, dict):
            raise ApiKeyError(f"{where} must be a table with sha256 (or key) and service or admin")
        digest, key = _parse_entry(name, entry, where)
        if digest in names_by_digest:
            raise ApiKeyError(
                f"{where} has the same key as [keys.{names_by_digest[digest]}]; "
                "each key must map to exactly one identity"
            )
        names_by_digest[digest] = name
        by_digest[digest] = key
    return by_digest


def _parse_entry(name: str, entry: Mapping[str, Any], where: str) -> tuple[str, ApiKey]:
    for field_name in entry:
        if field_name not in ENTRY_KEYS:
            raise ApiKeyError(
                f"{where}: unknown key {field_name!r}{did_you_mean(field_name, ENTRY_KEYS)} "
                f"(keys: {', '.join(ENTRY_KEYS)})"
            )
    if ("sha256" in entry) == ("key" in entry):
        raise ApiKeyError(f"{where} needs exactly one of sha256 (preferred) or key")
    if "sha256" in entry:
        digest = entry["sha256"]
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise ApiKeyError(f"{where}: sha256 must be 64 hex digits (the SHA-256 of the key)")
        digest = digest.lower()
    else:
        plaintext = entry["key"]
        if not isinstance(plaintext, str) or not plaintext:
            raise ApiKeyError(f"{where}: key must be a non-empty string")
        _log.warning("%s stores its key in plain text; store its sha256 instead", where)
        digest = hash_key(plaintext)
    service = entry.get("service")
    if service is not None and (not isinstance(service, str) or not service):
        raise ApiKeyError(f"{where}: service must be a non-empty string (a service_name)")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise ApiKeyError(f"{where}: admin must be true or false")
    if service is None and not admin:
        raise ApiKeyError(f'{where} may act for nothing: set service = "<service_name>" or admin = true')
    queue = entry.get("queue")
    if queue is not None and (not isinstance(queue, str) or not _QUEUE_NAME.fullmatch(queue)):
        raise ApiKeyError(f"{where}: queue must be a queue name ([queues.<name>]): letters, digits, '-', '_' or '.'")
    return digest, ApiKey(name=name, service=service, admin=admin, queue=queue)
