"""The piggyback queue and the packet-size bound (memberlist TransmitLimitedQueue)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.swim import SwimCore
from coordinator.swim_broadcasts import BroadcastQueue
from coordinator.swim_config import lan, memberlist_lan
from coordinator.swim_messages import Alive, Dead, Ping, Suspect, encode_header, encode_message, frame


def test_each_broadcast_is_sent_exactly_retransmit_limit_times() -> None:
    """SWIM §4.1 / memberlist: a message is piggybacked λ·log N times, then dropped."""
    q = BroadcastQueue(64)
    q.push("a", b"x" * 10)
    sends = 0
    while q.take(1000, limit=5):
        sends += 1
    assert sends == 5 and len(q) == 0


def test_newer_news_about_a_member_supersedes_older() -> None:
    q = BroadcastQueue(64)
    q.push("a", b"old")
    q.take(1000, limit=5)
    q.push("a", b"new")
    assert q.take(1000, limit=5) == [b"new"] and q.transmits("a") == 1


def test_least_transmitted_first_and_skips_what_does_not_fit() -> None:
    q = BroadcastQueue(64)
    q.push("a", b"a" * 100)
    q.take(1000, limit=9)
    q.push("c", b"c" * 20)
    q.push("b", b"b" * 50)
    # Untransmitted first, newest first among them; c (20) no longer fits in the last 10.
    assert q.take(60, limit=9) == [b"b" * 50]
    assert q.take(30, limit=9) == [b"c" * 20]  # then c; a (100) never fits in 30
    assert q.take(200, limit=9) == [b"b" * 50, b"c" * 20, b"a" * 100]  # all sent once: newest first


def test_queue_depth_is_bounded_dropping_the_most_sent() -> None:
    q = BroadcastQueue(16)
    q.push("old", b"o")
    for _ in range(3):
        q.take(1000, limit=99)
    for i in range(16):
        q.push(f"m{i}", b"m")
    assert len(q) == 16 and "old" not in q


@given(
    st.lists(st.tuples(st.integers(0, 1024), st.sampled_from(["alive", "suspect", "dead"])), min_size=1, max_size=60),
    st.integers(0, 2**32),
    st.sampled_from(["lan", "memberlist"]),
)
@settings(max_examples=60, deadline=None)
def test_every_datagram_fits_the_packet_size(news: list[tuple[int, str]], seed: int, prof: str) -> None:
    """Whatever is queued - many members, metadata up to the cap - no datagram the core
    produces (probe, ack, gossip, join reply, indirect probe, nack) exceeds packet_size."""
    cfg = lan() if prof == "lan" else memberlist_lan()
    core = SwimCore(cfg, "me" * 40, ("fe80::1234:5678:9abc:def0", 7946), b"z" * cfg.max_meta_size, random.Random(seed), 0.0)
    src = ("10.0.0.9", 9)
    for i, (size, kind) in enumerate(news):
        name = f"member-{i:03d}" * 4
        meta = b"m" * min(size, cfg.max_meta_size)
        parts = [encode_message(Alive(1, name, (f"10.1.{i // 256}.{i % 256}", 7946), meta))]
        if kind == "suspect":
            parts.append(encode_message(Suspect(1, name, "x")))
        elif kind == "dead":
            parts.append(encode_message(Dead(1, name, "x")))
        core.receive(frame(encode_header("x", 0), parts), src, 0.0)
    core.receive(frame(encode_header("x", 0), [encode_message(Ping(1, ""))]), src, 0.0)
    core.join([("10.9.9.9", 1)], 0.0)
    now = 0.0
    for _ in range(200):
        now = max(now, core.next_deadline())
        core.tick(now)
    core.set_meta(b"y" * cfg.max_meta_size, now)
    core.tick(now + 1)
    out = core.take_datagrams()
    assert out
    assert max(len(d) for _, d in out) <= cfg.packet_size
