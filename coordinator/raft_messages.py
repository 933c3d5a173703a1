"""Raft wire format: entries, snapshots, hard state and the one message shape.

Theory of operation
-------------------
Like etcd-io/raft's `raftpb.Message`, every RPC is one `Message` whose `kind`
says which of its fields matter (Raft paper Fig. 2 names in brackets):

    VOTE / PRE_VOTE          term, index+log_term [lastLogIndex/Term], force (transfer)
    VOTE_RESP / PRE_VOTE_RESP term, reject [voteGranted = not reject]
    APP                      term, index+log_term [prevLogIndex/Term], entries, commit
    APP_RESP                 term, index (last index the follower now matches) or,
                             when reject, index (the rejected prevLogIndex),
                             reject_hint + log_term (the fast back-off hint)
    HEARTBEAT / _RESP        term, commit (≤ the follower's known match), context (read index)
    SNAP                     term, snapshot [InstallSnapshot, sent whole]
    TIMEOUT_NOW              term (leadership transfer: campaign now, thesis §3.10)

Messages travel as plain dicts (`to_wire`) packed with msgpack (`encode_message`).
`decode_message` is the single entry point for untrusted bytes: it returns a
fully validated `Message` or raises `MalformedMessage`, never anything else.
Node ids are non-empty strings (the agents' SWIM names).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack

MAX_ID_BYTES = 128
MAX_COUNTER = (1 << 63) - 1
# One message is at most this big on the wire (a snapshot included); the
# transport refuses larger frames before they reach the decoder.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

NodeId = str


class MalformedMessage(Exception):
    """Bytes or a dict that are not a valid Raft message."""


class EntryType(enum.IntEnum):
    NORMAL = 0  # opaque application data (the lease table's commands)
    CONF_CHANGE = 1  # data = encode_voters(the complete new voter set)
    NOOP = 2  # appended by every new leader (Raft §8: commits the previous terms' entries)


class MessageKind(enum.IntEnum):
    VOTE = 0
    VOTE_RESP = 1
    PRE_VOTE = 2
    PRE_VOTE_RESP = 3
    APP = 4
    APP_RESP = 5
    HEARTBEAT = 6
    HEARTBEAT_RESP = 7
    SNAP = 8
    TIMEOUT_NOW = 9


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before any message of the same Ready is sent (Raft Fig. 2)."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state machine as of `index` (whose term is `term`), with the voters at that point."""

    index: int
    term: int
    voters: tuple[NodeId, ...]
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Message:
    kind: MessageKind
    sender: NodeId
    to: NodeId
    term: int
    index: int = 0
    log_term: int = 0
    commit: int = 0
    entries: tuple[Entry, ...] = ()
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    force: bool = False
    context: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        """A plain dict of str/int/bool/bytes/lists (msgpack- and JSON-with-base64-friendly)."""
        wire: dict[str, Any] = {"k": int(self.kind), "f": self.sender, "t": self.to, "T": self.term}
        if self.index:
            wire["i"] = self.index
        if self.log_term:
            wire["lt"] = self.log_term
        if self.commit:
            wire["c"] = self.commit
        if self.entries:
            wire["e"] = [[e.index, e.term, int(e.type), e.data] for e in self.entries]
        if self.reject:
            wire["r"] = True
        if self.reject_hint:
            wire["rh"] = self.reject_hint
        if self.snapshot is not None:
            s = self.snapshot
            wire["s"] = [s.index, s.term, list(s.voters), s.data]
        if self.force:
            wire["fo"] = True
        if self.context:
            wire["x"] = self.context
        return wire


def encode_voters(voters: Sequence[NodeId]) -> bytes:
    """The data of a CONF_CHANGE entry: the sorted new voter set."""
    return msgpack.packb(sorted(voters), use_bin_type=True)  # type: ignore[no-any-return]


def decode_voters(data: bytes) -> tuple[NodeId, ...]:
    """Inverse of encode_voters; raises MalformedMessage."""
    try:
        raw = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises many types on garbage
        raise MalformedMessage(f"config change is not msgpack: {exc}") from None
    if not isinstance(raw, list):
        raise MalformedMessage("config change must be a list of node ids")
    voters = tuple(_node_id(v, "voter") for v in raw)
    if len(set(voters)) != len(voters):
        raise MalformedMessage("duplicate voter in config change")
    return voters


def encode_message(message: Message) -> bytes:
    return msgpack.packb(message.to_wire(), use_bin_type=True)  # type: ignore[no-any-return]


def decode_message(data: bytes) -> Message:
    """Validate and decode one message; raises MalformedMessage on anything else."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage("message too large")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise MalformedMessage(f"not msgpack: {type(exc).__name__}") from None
    return message_from_wire(raw)


_KEYS = {"k", "f", "t", "T", "i", "lt", "c", "e", "r", "rh", "s", "fo", "x"}


def message_from_wire(raw: object) -> Message:
    """Validate a dict made by `Message.to_wire`; raises MalformedMessage."""
    if not isinstance(raw, dict):
        raise MalformedMessage("message must be a map")
    unknown = set(raw) - _KEYS
    if unknown:
        raise MalformedMessage(f"unknown message fields {sorted(map(str, unknown))}")
    try:
        kind = MessageKind(_counter(raw.get("k"), "kind"))
    except ValueError:
        raise MalformedMessage(f"unknown message kind {raw.get('k')!r}") from None
    entries = tuple(_entry(e) for e in _list(raw.get("e", []), "entries"))
    index = _counter(raw.get("i", 0), "index")
    if entries:
        if kind is not MessageKind.APP:
            raise MalformedMessage(f"{kind.name} carries no entries")
        for offset, e in enumerate(entries, start=1):
            if e.index != index + offset:
                raise MalformedMessage("entries must follow the previous index contiguously")
    snapshot = None
    if "s" in raw:
        snapshot = _snapshot(raw["s"])
    if (snapshot is None) != (kind is not MessageKind.SNAP):
        raise MalformedMessage("a snapshot travels in SNAP messages, and only there")
    return Message(
        kind=kind,
        sender=_node_id(raw.get("f"), "sender"),
        to=_node_id(raw.get("t"), "to"),
        term=_counter(raw.get("T"), "term"),
        index=index,
        log_term=_counter(raw.get("lt", 0), "log_term"),
        commit=_counter(raw.get("c", 0), "commit"),
        entries=entries,
        reject=_bool(raw.get("r", False), "reject"),
        reject_hint=_counter(raw.get("rh", 0), "reject_hint"),
        snapshot=snapshot,
        force=_bool(raw.get("fo", False), "force"),
        context=_bytes(raw.get("x", b""), "context"),
    )


def _entry(raw: object) -> Entry:
    items = _list(raw, "entry")
    if len(items) != 4:
        raise MalformedMessage("an entry is [index, term, type, data]")
    try:
        etype = EntryType(_counter(items[2], "entry type"))
    except ValueError:
        raise MalformedMessage(f"unknown entry type {items[2]!r}") from None
    entry = Entry(_counter(items[0], "entry index"), _counter(items[1], "entry term"), etype, _bytes(items[3], "data"))
    if entry.index < 1 or entry.term < 1:
        raise MalformedMessage("entries have index ≥ 1 and term ≥ 1")
    if etype is EntryType.CONF_CHANGE:
        decode_voters(entry.data)
    return entry


def _snapshot(raw: object) -> Snapshot:
    items = _list(raw, "snapshot")
    if len(items) != 4:
        raise MalformedMessage("a snapshot is [index, term, voters, data]")
    voters = tuple(_node_id(v, "voter") for v in _list(items[2], "voters"))
    return Snapshot(_counter(items[0], "snapshot index"), _counter(items[1], "snapshot term"), voters, _bytes(items[3], "snapshot data"))


def _counter(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNTER:
        raise MalformedMessage(f"{what} must be an integer in 0..2^63-1")
    return value


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise MalformedMessage(f"{what} must be a boolean")
    return value


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise MalformedMessage(f"{what} must be bytes")
    return value


def _list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise MalformedMessage(f"{what} must be a list")
    return value


def _node_id(value: object, what: str) -> NodeId:
    if not isinstance(value, str) or not 0 < len(value.encode()) <= MAX_ID_BYTES:
        raise MalformedMessage(f"{what} must be a node id of 1..{MAX_ID_BYTES} UTF-8 bytes")
    return value


__all__ = [
    "Entry",
    "EntryType",
    "HardState",
    "MalformedMessage",
    "Message",
    "MessageKind",
    "NodeId",
    "Snapshot",
    "decode_message",
    "decode_voters",
    "encode_message",
    "encode_voters",
    "message_from_wire",
]
