"""The Raft wire format: every message kind round-trips, and garbage is always MalformedMessage."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.raft_messages import (
    Entry,
    EntryType,
    MalformedMessage,
    Message,
    MessageKind,
    Snapshot,
    decode_message,
    decode_voters,
    encode_message,
    encode_voters,
)

SAMPLES = [
    Message(MessageKind.VOTE, "a", "b", 3, index=7, log_term=2, force=True),
    Message(MessageKind.PRE_VOTE_RESP, "b", "a", 4, reject=True),
    Message(
        MessageKind.APP, "a", "b", 3, index=7, log_term=2, commit=6,
        entries=(Entry(8, 3, EntryType.NORMAL, b"\x00cmd"), Entry(9, 3, EntryType.CONF_CHANGE, encode_voters(["a", "b"])), Entry(10, 3, EntryType.NOOP)),
    ),
    Message(MessageKind.APP_RESP, "b", "a", 3, index=7, reject=True, reject_hint=5, log_term=1),
    Message(MessageKind.HEARTBEAT, "a", "b", 3, commit=5, context=b"read-1"),
    Message(MessageKind.SNAP, "a", "b", 3, snapshot=Snapshot(40, 2, ("a", "b", "c"), b"state")),
    Message(MessageKind.TIMEOUT_NOW, "a", "b", 3),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.kind.name)
def test_every_kind_round_trips(message: Message) -> None:
    """encode → decode is the identity, through plain dicts and msgpack."""
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "wire",
    [
        {"k": 99, "f": "a", "t": "b", "T": 1},  # unknown kind
        {"k": 4, "f": "a", "t": "b", "T": -1},  # negative term
        {"k": 4, "f": "", "t": "b", "T": 1},  # empty id
        {"k": 4, "f": "a", "t": "b", "T": 1, "zz": 1},  # unknown field
        {"k": 4, "f": "a", "t": "b", "T": 1, "i": 3, "e": [[5, 1, 0, b""]]},  # gap after prev index
        {"k": 0, "f": "a", "t": "b", "T": 1, "e": [[1, 1, 0, b""]]},  # entries on a vote
        {"k": 8, "f": "a", "t": "b", "T": 1},  # SNAP without a snapshot
        {"k": 4, "f": "a", "t": "b", "T": 1, "e": [[1, 1, 1, b"\xc1"]]},  # bad config change
        {"k": 4, "f": "a", "t": "b", "T": True},  # bool is not an int
        [1, 2, 3],
    ],
)
def test_invalid_messages_are_malformed(wire: object) -> None:
    """Decoding validates every field before anything reaches the core."""
    with pytest.raises(MalformedMessage):
        decode_message(msgpack.packb(wire, use_bin_type=True))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_malformed_message(data: bytes) -> None:
    """decode_message is the single entry point for untrusted bytes: it returns a Message or
    raises MalformedMessage, never any other exception."""
    try:
        decode_message(data)
    except MalformedMessage:
        pass


@settings(max_examples=200)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=8) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["k", "f", "t", "T", "i", "e", "s", "x"]), inner, max_size=6),
                    max_leaves=20))
def test_arbitrary_msgpack_structures_raise_only_malformed_message(value: object) -> None:
    """Structurally plausible garbage (maps with the right keys, wrong shapes) too."""
    try:
        decode_message(msgpack.packb(value, use_bin_type=True))
    except MalformedMessage:
        pass


def test_voters_encoding_is_sorted_and_rejects_duplicates() -> None:
    """A CONF_CHANGE entry holds the complete new voter set, canonically ordered."""
    assert decode_voters(encode_voters(["c", "a", "b"])) == ("a", "b", "c")
    with pytest.raises(MalformedMessage):
        decode_voters(msgpack.packb(["a", "a"]))
