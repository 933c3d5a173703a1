"""The gossip transport on loopback sockets, in one process: sealing, push-pull, drops."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Awaitable, Callable

import trio

from agent.cluster_keyring import KeyringFile, generate_key, install_key
from agent.gossip_transport import Address, GossipTransport, PushPullError

HOST = "127.0.0.1"


def keyring(tmp_path: Path, name: str, key: str) -> KeyringFile:
    path = tmp_path / name
    install_key(path, key)
    return KeyringFile(path)


def transport(ring: KeyringFile | None) -> GossipTransport:
    return GossipTransport(HOST, 0, ring, max_packet_bytes=1400, max_state_bytes=4096, tcp_timeout_s=1.0)


def run(test: Callable[[trio.Nursery], Awaitable[None]], *transports: GossipTransport) -> None:
    """Run `test` with a nursery for servers; close every transport afterwards."""

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(10):
                    await test(nursery)
                nursery.cancel_scope.cancel()
        finally:
            for t in transports:
                await t.aclose()

    trio.run(main)


def test_sealed_datagrams_reach_a_peer_with_the_key_and_not_one_without(tmp_path: Path) -> None:
    key = generate_key()
    a, b = transport(keyring(tmp_path, "a", key)), transport(keyring(tmp_path, "b", key))
    stranger = transport(keyring(tmp_path, "c", generate_key()))
    got: list[tuple[bytes, Address]] = []

    async def test(nursery: trio.Nursery) -> None:
        for t in (a, b, stranger):
            await t.open()
        await nursery.start(b.serve_udp, lambda payload, source: got.append((payload, source)))
        await a.send_datagram((HOST, b.port), b"hello")
        await stranger.send_datagram((HOST, b.port), b"intruder")
        await a.send_datagram((HOST, b.port), b"x" * 1500)  # over the packet size
        while b.stats.packets["in"] < 3:
            await trio.sleep(0.01)

    run(test, a, b, stranger)
    assert got == [(b"hello", (HOST, a.port))]
    assert b.stats.dropped == {"decrypt": 1, "malformed": 0, "oversized": 1}
    assert a.stats.packets["out"] == 2 and a.stats.bytes["out"] > len(b"hello") + 1500


def test_push_pull_exchanges_states_both_ways(tmp_path: Path) -> None:
    key = generate_key()
    a, b = transport(keyring(tmp_path, "a", key)), transport(keyring(tmp_path, "b", key))
    merged: list[bytes] = []
    answers: list[bytes] = []

    async def test(nursery: trio.Nursery) -> None:
        await a.open()
        await b.open()
        await nursery.start(b.serve_tcp, lambda: b"state of b", lambda state, source: merged.append(state))
        answers.append(await a.push_pull((HOST, b.port), b"state of a"))

    run(test, a, b)
    assert (answers, merged) == ([b"state of b"], [b"state of a"])
    assert a.stats.push_pulls == {"ok": 1, "failed": 0}


def test_bad_frames_are_dropped_and_counted_and_the_listener_keeps_serving(tmp_path: Path) -> None:
    key = generate_key()
    b = transport(keyring(tmp_path, "b", key))
    a = transport(keyring(tmp_path, "a", key))
    merged: list[bytes] = []

    async def send_raw(data: bytes) -> None:
        stream = await trio.open_tcp_stream(HOST, b.port)
        async with stream:
            await stream.send_all(data)
            await stream.send_eof()
            try:
                await stream.receive_some(65536)
            except trio.BrokenResourceError:
                pass

    async def test(nursery: trio.Nursery) -> None:
        await a.open()
        await b.open()
        await nursery.start(b.serve_tcp, lambda: b"state of b", lambda state, source: merged.append(state))
        await send_raw(struct.pack(">I", 1 << 30))  # declares more than max_state_bytes
        await send_raw(struct.pack(">I", 100) + b"short")  # truncated
        await send_raw(struct.pack(">I", 40) + b"\x01" * 40)  # does not open
        assert await a.push_pull((HOST, b.port), b"still works") == b"state of b"

    run(test, a, b)
    assert merged == [b"still works"]
    assert b.stats.dropped == {"decrypt": 1, "malformed": 1, "oversized": 1}


def test_a_push_pull_to_nobody_fails_cleanly(tmp_path: Path) -> None:
    a = transport(None)
    failures: list[str] = []

    async def test(nursery: trio.Nursery) -> None:
        await a.open()
        closed = transport(None)
        port = await closed.open()
        await closed.aclose()
        try:
            await a.push_pull((HOST, port), b"anyone?")
        except PushPullError as error:
            failures.append(str(error))

    run(test, a)
    assert len(failures) == 1 and a.stats.push_pulls["failed"] == 1
