"""The SWIM wire format: round trips, size bounds, and a decoder that fails only one way.

h11's rule for untrusted bytes: one entry point, one error class. Hypothesis
throws random bytes, mutated valid datagrams and arbitrary msgpack objects at
`decode_packet` / `decode_state` / `SwimCore.receive`; the only exception allowed
out is MalformedPacket.
"""

from __future__ import annotations

import random

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.swim import SwimCore
from coordinator.swim_config import lan
from coordinator.swim_messages import (
    FRAME_OVERHEAD,
    MAX_COUNTER,
    MAX_NAME_BYTES,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Join,
    MalformedPacket,
    Nack,
    Ping,
    StateEntry,
    Suspect,
    decode_packet,
    decode_state,
    encode_header,
    encode_message,
    encode_state,
    frame,
    worst_case_sizes,
)

names = st.text(min_size=1, max_size=20).filter(lambda s: 0 < len(s.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES)
safe_names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=30)
counters = st.integers(0, MAX_COUNTER)
addresses = st.tuples(st.text(alphabet="0123456789.:abcdef", min_size=1, max_size=39), st.integers(0, 65535))
messages = st.one_of(
    st.builds(Ping, counters, st.one_of(st.just(""), safe_names)),
    st.builds(IndirectPing, counters, safe_names, addresses, st.booleans()),
    st.builds(Ack, counters),
    st.builds(Nack, counters),
    st.builds(Alive, counters, safe_names, addresses, st.binary(max_size=1024)),
    st.builds(Suspect, counters, safe_names, safe_names),
    st.builds(Dead, counters, safe_names, safe_names),
    st.builds(Join, counters),
)


@given(safe_names, counters, st.lists(messages, max_size=20))
def test_round_trip(sender: str, inc: int, msgs: list[object]) -> None:
    """Every message decodes to exactly what was encoded, in order."""
    data = frame(encode_header(sender, inc), [encode_message(m) for m in msgs])  # type: ignore[arg-type]
    packet = decode_packet(data, max_meta_size=1024)
    assert (packet.sender, packet.sender_incarnation, list(packet.messages)) == (sender, inc, msgs)


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_random_bytes_raise_only_malformed_packet(data: bytes) -> None:
    for blob in (data, b"S\x01" + data):
        try:
            decode_packet(blob, max_meta_size=1024)
        except MalformedPacket:
            pass
        try:
            decode_state(blob, max_meta_size=1024)
        except MalformedPacket:
            pass


@given(st.lists(messages, min_size=1, max_size=6), st.data())
@settings(max_examples=300)
def test_mutated_datagrams_raise_only_malformed_packet(msgs: list[object], data: st.DataObject) -> None:
    """Flip, cut and splice bytes of valid datagrams: decode or MalformedPacket, nothing else."""
    raw = bytearray(frame(encode_header("a", 1), [encode_message(m) for m in msgs]))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i:]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        decode_packet(bytes(raw), max_meta_size=1024)
    except MalformedPacket:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@given(st.lists(msgpack_values, max_size=8))
@settings(max_examples=300)
def test_well_formed_msgpack_with_wrong_shapes_raises_only_malformed_packet(objs: list[object]) -> None:
    """Structurally valid msgpack with nonsense fields (floats for ints, maps, bools, ...)."""
    blob = b"S\x01" + msgpack.packb(["a", 1, *objs])
    try:
        decode_packet(blob, max_meta_size=1024)
    except MalformedPacket:
        pass
    try:
        decode_state(msgpack.packb([1, objs]), max_meta_size=1024)
    except MalformedPacket:
        pass


@given(st.binary(max_size=300))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_core_receive_raises_only_malformed_packet_and_keeps_state(data: bytes) -> None:
    core = SwimCore(lan(), "a", ("10.0.0.1", 1), b"", random.Random(1), 0.0)
    before = core.members()
    try:
        core.receive(b"S\x01" + data, ("10.0.0.2", 2), 1.0)
    except MalformedPacket:
        assert core.members() == before and core.take_datagrams() == []


def test_bool_is_not_an_integer_and_sizes_are_enforced() -> None:
    for bad in (
        ["a", True],  # bool incarnation
        ["a", -1],
        ["", 0],  # empty sender
        ["a", 0, [4, 0, "b", "h", 70000, b""]],  # port out of range
        ["a", 0, [4, 0, "b", "h", 1, b"x" * 1025]],  # metadata over the cap
        ["a", 0, [4, 0, "b" * (MAX_NAME_BYTES + 1), "h", 1, b""]],
    ):
        try:
            decode_packet(b"S\x01" + msgpack.packb(bad), max_meta_size=1024)
        except MalformedPacket:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_state_round_trip() -> None:
    entries = [
        StateEntry("a", ("10.0.0.1", 1), 3, "alive", b"meta"),
        StateEntry("b", ("10.0.0.2", 2), 0, "dead", b""),
        StateEntry("c", ("10.0.0.3", 3), 9, "left", b""),
        StateEntry("d", ("10.0.0.4", 4), 1, "suspect", b"x"),
    ]
    assert decode_state(encode_state(entries), max_meta_size=1024) == entries


def test_worst_case_message_fits_default_packet() -> None:
    """With the lan cap (1,024-byte metadata) the largest message plus header fits 1,400 bytes."""
    header, biggest = worst_case_sizes(1024)
    assert header + biggest <= 1400
    assert header >= FRAME_OVERHEAD
