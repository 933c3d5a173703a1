"""The cluster key file: AES-256-GCM sealing of gossip traffic, and key rotation.

Theory of operation
-------------------
Every gossip packet (UDP) and push-pull frame (TCP) between agents is sealed
with AES-256-GCM under a key shared by the whole cluster. The key file holds
one or more keys, one per line, each the standard base64 of 32 random bytes;
blank lines and lines starting with ``#`` are ignored::

    # primary: seals everything this agent sends
    9m0dF3S6vYbqg1M0...=
    # also accepted when opening (a key being rotated in or out)
    Zk1+2JpQ...=

The **first** key is the primary: `seal` always uses it. `open` tries **every**
key, so an agent accepts traffic sealed by any key it holds. That is what lets
a key be rotated without downtime, one agent at a time (the same three steps
as Serf/Consul's keyring):

1. ``install`` the new key on every agent: each now accepts it, still seals
   with the old one;
2. ``use`` it on every agent: each now seals with it; agents not yet switched
   still open it (step 1), and switched ones still open the old key;
3. ``remove`` the old key from every agent.

`install_key`, `use_key` and `remove_key` rewrite the file atomically (a
temporary file in the same directory, fsync, rename), so a running agent that
re-reads the file (`KeyringFile.reload_if_changed`) sees the old or the new
file, never half of one. ``python -m agent.cluster_keyring`` runs them from a
shell (see docs/membership.md, "Rotating the cluster key").

A sealed message is ``version (1 byte) || nonce (12 random bytes) ||
ciphertext || tag (16 bytes)``; 29 bytes of overhead. The nonce is random
(96 bits, from the OS), as memberlist does: no counter state to persist
across restarts, at the price of a birthday bound that makes periodic key
rotation (monthly, say) good hygiene on a busy cluster. The caller's `aad`
binds a message to its channel (UDP vs TCP) so one cannot be replayed as the
other.

Error handling
--------------
`open` raises `SealError` for anything that does not authenticate (wrong key,
truncated, garbage, unknown version), and never returns unauthenticated bytes:
a packet that fails is never parsed. A key file that cannot be read or holds a
malformed key raises `KeyringError` (a ValueError, so the agent refuses to
start with the reason).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import logging
import os
import secrets
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12  # GCM's standard nonce size
TAG_BYTES: Final = 16
VERSION: Final = 1
OVERHEAD: Final = 1 + NONCE_BYTES + TAG_BYTES
# Bounded so a hand-edited file cannot make every failed packet cost hundreds of
# decryption attempts; a rotation needs two keys at once, a few spare is plenty.
MAX_KEYS: Final = 8


class KeyringError(ValueError):
    """The key file is missing, unreadable or holds something that is not a key."""


class SealError(Exception):
    """A sealed message did not authenticate under any key (or is not a sealed message at all)."""


def generate_key() -> str:
    """Return a new random key, base64-encoded, as a line of the key file takes it."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def decode_key(text: str) -> bytes:
    """Return the 32 bytes of a base64 key; raise KeyringError when it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("a key must be standard base64 (e.g. from `generate`)") from None
    if len(raw) != KEY_BYTES:
        raise KeyringError(f"a key must be {KEY_BYTES} bytes (AES-256), this one is {len(raw)}")
    return raw


def fingerprint(key: bytes) -> str:
    """A short, non-secret name for a key (first 8 hex digits of its SHA-256), for logs and listings."""
    return hashlib.sha256(key).hexdigest()[:8]


class Keyring:
    """The keys in force: `keys[0]` seals, every key opens. Immutable; equal when the keys are."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise KeyringError("a keyring needs at least one key")
        if len(keys) > MAX_KEYS:
            raise KeyringError(f"a keyring holds at most {MAX_KEYS} keys, got {len(keys)}")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise KeyringError(f"a key must be {KEY_BYTES} bytes, got {len(key)}")
        self.keys: tuple[bytes, ...] = tuple(keys)
        # One AESGCM per key, built once: key expansion is not free.
        self._ciphers = tuple(AESGCM(key) for key in self.keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and other.keys == self.keys

    def __hash__(self) -> int:
        return hash(self.keys)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Read a key file. Raises KeyringError when it is unreadable, empty or malformed."""
        try:
            text = path.read_text(encoding="ascii")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as error:
            raise KeyringError(f"cannot read cluster key file {path}: {error}") from None
        # Group read is the documented set-up (root:gpu-agent 0640: operators
        # edit it as root, the agent reads it through its group); anything
        # more lets someone other than the agent read or change the key.
        if mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
            log.warning(
                "cluster key file %s is open to others or group-writable (mode %o); "
                "chmod 640 it (root:gpu-agent), or 600",
                path,
                stat.S_IMODE(mode),
            )
        try:
            keys = parse_keys(text)
        except KeyringError as error:
            raise KeyringError(f"cluster key file {path}: {error}") from None
        if not keys:
            raise KeyringError(f"cluster key file {path} holds no key")
        return cls(keys)

    @property
    def primary(self) -> bytes:
        return self.keys[0]

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Return `plaintext` encrypted and authenticated under the primary key, bound to `aad`."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return bytes([VERSION]) + nonce + self._ciphers[0].encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Return the plaintext of a sealed message, trying every key.

        Raises SealError when it is too short, of an unknown version, or does not
        authenticate under any key with this `aad`.
        """
        if len(sealed) < OVERHEAD:
            raise SealError(f"sealed message too short ({len(sealed)} bytes)")
        if sealed[0] != VERSION:
            raise SealError(f"unknown sealed message version {sealed[0]}")
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        raise SealError("message does not authenticate under any cluster key")


def parse_keys(text: str) -> list[bytes]:
    """Return the keys of a key file's text, in order; raise KeyringError naming a bad line."""
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = decode_key(line)
        except KeyringError as error:
            raise KeyringError(f"line {number}: {error}") from None
        if key not in keys:
            keys.append(key)
    return keys


class KeyringFile:
    """A key file and the keyring last read from it; re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keyring = Keyring.load(path)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        # ctime too: a chmod or chown that makes an unreadable file readable
        # changes nothing else, and must still get the file re-read.
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since the last read; return True if the keyring changed.

        A file that has become unreadable or malformed is logged and the keys in
        force are kept: a botched edit must not cut this agent off the cluster.
        """
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keyring = Keyring.load(self.path)
        except KeyringError as error:
            log.error("%s; keeping the %d key(s) in force", error, len(self.keyring.keys))
            return False
        if keyring == self.keyring:
            return False
        log.info(
            "cluster keyring reloaded: primary %s, %d key(s)",
            fingerprint(keyring.primary),
            len(keyring.keys),
        )
        self.keyring = keyring
        return True


# --- rotation: atomic rewrites of the key file ---------------------------------------


def write_keys(path: Path, keys: Sequence[bytes]) -> None:
    """Replace the key file with `keys` (first = primary), atomically.

    A new file gets mode 0600 and the caller's owner. An existing file keeps its
    mode, owner and group: the rewrite is a new inode, and a root-run rotation
    of a root:gpu-agent 0640 file must not leave a root:root 0600 one that the
    agent can no longer read. Raises KeyringError when the owner or group cannot
    be kept (only root may give a file away), before anything is replaced.
    """
    Keyring(keys)  # validates count and sizes before anything is written
    lines = ["# gpu-orchestrator cluster keys: the first seals, all open (docs/membership.md)"]
    lines += [base64.b64encode(key).decode("ascii") for key in keys]
    try:
        existing: os.stat_result | None = path.stat()
    except FileNotFoundError:
        existing = None
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if existing is None else stat.S_IMODE(existing.st_mode))
        if existing is not None:
            mine = os.fstat(fd)
            if (mine.st_uid, mine.st_gid) != (existing.st_uid, existing.st_gid):
                try:
                    os.fchown(fd, existing.st_uid, existing.st_gid)
                except PermissionError:
                    raise KeyringError(
                        f"cannot keep the owner and group of {path} "
                        f"(uid {existing.st_uid}, gid {existing.st_gid}); run this as root"
                    ) from None
        with os.fdopen(fd, "w", encoding="ascii") as stream:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself must survive a crash
    finally:
        os.close(directory)


def _read_existing(path: Path) -> list[bytes]:
    return list(Keyring.load(path).keys)


def install_key(path: Path, key: str) -> None:
    """Add `key` as accepted (not primary). Creates the file, with it as primary, if missing."""
    raw = decode_key(key)
    if not path.exists():
        write_keys(path, [raw])
        return
    keys = _read_existing(path)
    if raw not in keys:
        write_keys(path, [*keys, raw])


def use_key(path: Path, key: str) -> None:
    """Make an installed `key` the primary. Raises KeyringError if it is not installed."""
    raw = decode_key(key)
    keys = _read_existing(path)
    if raw not in keys:
        raise KeyringError(f"key {fingerprint(raw)} is not installed in {path}; install it first")
    write_keys(path, [raw, *(k for k in keys if k != raw)])


def remove_key(path: Path, key: str) -> None:
    """Remove `key`. Raises KeyringError for the primary (use another first) or an unknown key."""
    raw = decode_key(key)
    keys = _read_existing(path)
    if raw not in keys:
        raise KeyringError(f"key {fingerprint(raw)} is not in {path}")
    if keys[0] == raw:
        raise KeyringError(f"key {fingerprint(raw)} is the primary; `use` another key before removing it")
    write_keys(path, [k for k in keys if k != raw])


# --- command line: python -m agent.cluster_keyring ... ------------------------------


def main(argv: list[str] | None = None, *, prog: str = "python -m agent.cluster_keyring") -> int:
    """Run a keyring command; returns the exit status (0 ok, 1 refused, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Generate cluster keys and rotate them in a key file (docs/membership.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("generate", help="print a new random key")
    listing = commands.add_parser("list", help="show the fingerprints of a file's keys, primary first")
    listing.add_argument("path", type=Path)
    for name, text in (
        ("install", "add KEY as accepted (creates the file if missing)"),
        ("use", "make the installed KEY the primary"),
        ("remove", "remove KEY (not the primary)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("path", type=Path)
        sub.add_argument("key", help="base64 key, or - to read it from standard input")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "generate":
            print(generate_key())
        elif args.command == "list":
            for number, raw in enumerate(Keyring.load(args.path).keys):
                print(f"{fingerprint(raw)}{'  (primary)' if number == 0 else ''}")
        else:
            key = sys.stdin.readline() if args.key == "-" else args.key
            {"install": install_key, "use": use_key, "remove": remove_key}[args.command](args.path, key)
    except (KeyringError, OSError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
