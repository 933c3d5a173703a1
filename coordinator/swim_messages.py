"""SWIM wire format: message types, compound framing and the push-pull state.

Theory of operation
-------------------
Every UDP datagram is one *compound*: a two-byte preamble (magic ``0x53`` "S",
format version ``1``), then one msgpack array:

    [sender name (str), sender incarnation (int), message, message, ...]

Each message is itself a msgpack array whose first element is its type code
(`MessageType`). There is no per-message length prefix: msgpack is
self-delimiting, so a compound's size is exactly
``2 + array header (1 or 3 bytes) + len(header) + Σ len(part)`` and the sender
can pack parts greedily up to the packet size without guessing.
Each part is encoded once (`encode_message`) and the same bytes are reused for
every retransmission of a broadcast.

The sender header lets a receiver notice that it holds a stale verdict about
the sender (for example, "dead" from before a partition healed) and tell it, so
the sender can refute at once (see `SwimCore`).

Decoding is the single entry point for untrusted bytes: `decode_packet` and
`decode_state` either return fully validated immutable messages or raise
`MalformedPacket` — never any other exception, whatever the input. Nothing is
applied to the membership until the whole datagram has been decoded, so a bad
datagram changes no state.

Limits (all checked on decode, and by `SwimConfig.validate` on the sending side):
names ≤ `MAX_NAME_BYTES` UTF-8 bytes, hosts ≤ `MAX_HOST_BYTES`, ports 0–65535,
incarnations and sequence numbers 0 … 2⁶³−1, metadata ≤ the configured cap
(never above `MAX_META_LIMIT`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, Literal, Sequence, Union

import msgpack

MAGIC = 0x53
VERSION = 1
PREAMBLE = bytes((MAGIC, VERSION))
STATE_VERSION = 1

MAX_NAME_BYTES = 128
MAX_HOST_BYTES = 64
MAX_META_LIMIT = 4096
MAX_COUNTER = (1 << 63) - 1
# A push-pull state may be large (TCP), but not unboundedly so.
MAX_STATE_MEMBERS = 100_000

Address = tuple[str, int]

Status = Literal["alive", "suspect", "dead", "left"]
ALIVE: Final = "alive"
SUSPECT: Final = "suspect"
DEAD: Final = "dead"
LEFT: Final = "left"
STATUSES: tuple[Status, ...] = (ALIVE, SUSPECT, DEAD, LEFT)


class MalformedPacket(Exception):
    """A datagram or push-pull state that is not a valid SWIM encoding."""


class MessageType(enum.IntEnum):
    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    NACK = 3
    ALIVE = 4
    SUSPECT = 5
    DEAD = 6
    JOIN = 7


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. `target` names the member meant ("" = whoever listens there)."""

    seq: int
    target: str


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to probe `target` at `target_address` on our behalf (SWIM ping-req)."""

    seq: int
    target: str
    target_address: Address
    nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: the relay reached nobody, but it is alive and so are we."""

    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    name: str
    address: Address
    meta: bytes


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    name: str
    sender: str


@dataclass(frozen=True, slots=True)
class Dead:
    """`sender == name` means the member left gracefully."""

    incarnation: int
    name: str
    sender: str


@dataclass(frozen=True, slots=True)
class Join:
    """Ask the receiver to send its own alive message (and, if `members`, a few others')."""

    seq: int
    members: bool = True


Message = Union[Ping, IndirectPing, Ack, Nack, Alive, Suspect, Dead, Join]


@dataclass(frozen=True, slots=True)
class Packet:
    sender: str
    sender_incarnation: int
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One member in a push-pull state exchange."""

    name: str
    address: Address
    incarnation: int
    status: Status
    meta: bytes


# --- encoding -------------------------------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    """The msgpack bytes of one message (a compound part)."""
    fields: list[Any]
    if isinstance(msg, Ping):
        fields = [MessageType.PING, msg.seq, msg.target]
    elif isinstance(msg, IndirectPing):
        host, port = msg.target_address
        fields = [MessageType.INDIRECT_PING, msg.seq, msg.target, host, port, msg.nack]
    elif isinstance(msg, Ack):
        fields = [MessageType.ACK, msg.seq]
    elif isinstance(msg, Nack):
        fields = [MessageType.NACK, msg.seq]
    elif isinstance(msg, Alive):
        host, port = msg.address
        fields = [MessageType.ALIVE, msg.incarnation, msg.name, host, port, msg.meta]
    elif isinstance(msg, Suspect):
        fields = [MessageType.SUSPECT, msg.incarnation, msg.name, msg.sender]
    elif isinstance(msg, Dead):
        fields = [MessageType.DEAD, msg.incarnation, msg.name, msg.sender]
    else:
        fields = [MessageType.JOIN, msg.seq, msg.members]
    out: bytes = msgpack.packb([int(f) if isinstance(f, MessageType) else f for f in fields])
    return out


# Preamble plus the largest array header (array16): the framing bytes beyond the header.
FRAME_OVERHEAD = len(PREAMBLE) + 3


def encode_header(sender: str, incarnation: int) -> bytes:
    """The sender header (name, incarnation) that opens every datagram we send."""
    out: bytes = msgpack.packb(sender) + msgpack.packb(incarnation)
    return out


def frame(header: bytes, parts: Sequence[bytes]) -> bytes:
    """One datagram: preamble, array header, sender header, parts (each from encode_message)."""
    n = 2 + len(parts)
    if n < 16:
        head = bytes((0x90 | n,))
    else:
        head = b"\xdc" + n.to_bytes(2, "big")
    return PREAMBLE + head + header + b"".join(parts)


def worst_case_sizes(max_meta_size: int) -> tuple[int, int]:
    """(largest header, largest single message) in bytes for a given metadata cap.

    `SwimConfig.validate` requires their sum to fit the packet size, so any one
    message can always be sent, with the header, in a datagram of its own.
    """
    name = "n" * MAX_NAME_BYTES
    host = "h" * MAX_HOST_BYTES
    header = FRAME_OVERHEAD + len(encode_header(name, MAX_COUNTER))
    biggest = max(
        len(encode_message(Alive(MAX_COUNTER, name, (host, 65535), b"m" * max_meta_size))),
        len(encode_message(IndirectPing(MAX_COUNTER, name, (host, 65535), True))),
        len(encode_message(Dead(MAX_COUNTER, name, name))),
    )
    return header, biggest


def encode_state(entries: Sequence[StateEntry]) -> bytes:
    """The push-pull payload: every member the sender knows, itself included."""
    rows = [
        [e.name, e.address[0], e.address[1], e.incarnation, STATUSES.index(e.status), e.meta]
        for e in entries
    ]
    out: bytes = msgpack.packb([STATE_VERSION, rows])
    return out


# --- decoding -------------------------------------------------------------------------------


def _int(v: Any, hi: int = MAX_COUNTER) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise MalformedPacket(f"expected an integer in 0..{hi}, got {v!r:.40}")
    return v


def _str(v: Any, max_bytes: int, *, allow_empty: bool = False) -> str:
    if type(v) is not str:
        raise MalformedPacket(f"expected a string, got {type(v).__name__}")
    n = len(v.encode("utf-8", "surrogatepass"))
    if n > max_bytes or (n == 0 and not allow_empty):
        raise MalformedPacket(f"string of {n} bytes outside 1..{max_bytes}")
    return v


def _bytes(v: Any, max_len: int) -> bytes:
    if type(v) is not bytes or len(v) > max_len:
        raise MalformedPacket("expected metadata bytes within the size cap")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise MalformedPacket("expected a boolean")
    return v


def _arity(fields: list[Any], n: int) -> None:
    if len(fields) != n:
        raise MalformedPacket(f"message type {fields[0]} needs {n} fields, got {len(fields)}")


def _address(host: Any, port: Any) -> Address:
    return (_str(host, MAX_HOST_BYTES), _int(port, 65535))


def _decode_message(obj: Any, max_meta: int) -> Message:
    if type(obj) is not list or not obj:
        raise MalformedPacket("a message must be a non-empty array")
    kind = _int(obj[0], 255)
    if kind == MessageType.PING:
        _arity(obj, 3)
        return Ping(_int(obj[1]), _str(obj[2], MAX_NAME_BYTES, allow_empty=True))
    if kind == MessageType.INDIRECT_PING:
        _arity(obj, 6)
        return IndirectPing(
            _int(obj[1]), _str(obj[2], MAX_NAME_BYTES), _address(obj[3], obj[4]), _bool(obj[5])
        )
    if kind == MessageType.ACK:
        _arity(obj, 2)
        return Ack(_int(obj[1]))
    if kind == MessageType.NACK:
        _arity(obj, 2)
        return Nack(_int(obj[1]))
    if kind == MessageType.ALIVE:
        _arity(obj, 6)
        return Alive(
            _int(obj[1]), _str(obj[2], MAX_NAME_BYTES), _address(obj[3], obj[4]), _bytes(obj[5], max_meta)
        )
    if kind == MessageType.SUSPECT:
        _arity(obj, 4)
        return Suspect(_int(obj[1]), _str(obj[2], MAX_NAME_BYTES), _str(obj[3], MAX_NAME_BYTES))
    if kind == MessageType.DEAD:
        _arity(obj, 4)
        return Dead(_int(obj[1]), _str(obj[2], MAX_NAME_BYTES), _str(obj[3], MAX_NAME_BYTES))
    if kind == MessageType.JOIN:
        _arity(obj, 3)
        return Join(_int(obj[1]), _bool(obj[2]))
    raise MalformedPacket(f"unknown message type {kind}")


def _unpack(data: bytes) -> Any:
    # msgpack reports bad input as ValueError subclasses (ExtraData, FormatError,
    # StackError, UnicodeDecodeError) or UnpackException (OutOfData); this is the
    # one place they are turned into MalformedPacket. The hypothesis fuzz test
    # in tests/unit/test_swim_messages.py holds us to "nothing else escapes".
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MalformedPacket(f"undecodable msgpack: {type(exc).__name__}") from exc


def decode_packet(data: bytes, *, max_meta_size: int) -> Packet:
    """Decode and validate one datagram. Raises MalformedPacket, and only that."""
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedPacket("a datagram must be bytes")
    if len(data) < 4 or data[0] != MAGIC or data[1] != VERSION:
        raise MalformedPacket("bad preamble")
    objs = _unpack(bytes(data[2:]))
    if type(objs) is not list or len(objs) < 2:
        raise MalformedPacket("a datagram is one array opening with the sender header")
    sender = _str(objs[0], MAX_NAME_BYTES)
    incarnation = _int(objs[1])
    messages = tuple(_decode_message(o, max_meta_size) for o in objs[2:])
    return Packet(sender, incarnation, messages)


def decode_state(data: bytes, *, max_meta_size: int) -> list[StateEntry]:
    """Decode a push-pull state. Raises MalformedPacket, and only that."""
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedPacket("a state must be bytes")
    obj = _unpack(bytes(data))
    if type(obj) is not list or len(obj) != 2:
        raise MalformedPacket("a state is one [version, rows] array")
    version, rows = obj
    if version != STATE_VERSION or type(version) is not int:
        raise MalformedPacket(f"unsupported state version {version!r:.20}")
    if type(rows) is not list or len(rows) > MAX_STATE_MEMBERS:
        raise MalformedPacket("state rows must be a bounded array")
    out: list[StateEntry] = []
    for row in rows:
        if type(row) is not list or len(row) != 6:
            raise MalformedPacket("a state row has 6 fields")
        out.append(
            StateEntry(
                name=_str(row[0], MAX_NAME_BYTES),
                address=_address(row[1], row[2]),
                incarnation=_int(row[3]),
                status=STATUSES[_int(row[4], len(STATUSES) - 1)],
                meta=_bytes(row[5], max_meta_size),
            )
        )
    return out
