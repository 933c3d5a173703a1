"""The cluster keyring: AES-256-GCM sealing, the key file, and rotation without downtime."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from agent.cluster_keyring import (
    OVERHEAD,
    Keyring,
    KeyringError,
    KeyringFile,
    SealError,
    decode_key,
    generate_key,
    install_key,
    main,
    remove_key,
    use_key,
    write_keys,
)

AAD = b"test channel"


def keyring(*keys: str) -> Keyring:
    return Keyring([decode_key(k) for k in keys])


def test_round_trip_under_the_primary_key() -> None:
    ring = keyring(generate_key())
    sealed = ring.seal(b"hello cluster", AAD)
    assert len(sealed) == len(b"hello cluster") + OVERHEAD
    assert ring.open(sealed, AAD) == b"hello cluster"


def test_each_seal_uses_a_fresh_nonce() -> None:
    ring = keyring(generate_key())
    assert ring.seal(b"same", AAD) != ring.seal(b"same", AAD)


def test_a_wrong_key_does_not_open() -> None:
    sealed = keyring(generate_key()).seal(b"secret", AAD)
    with pytest.raises(SealError):
        keyring(generate_key()).open(sealed, AAD)


def test_a_different_channel_does_not_open() -> None:
    """The associated data binds a message to its channel: UDP cannot be replayed as TCP."""
    ring = keyring(generate_key())
    with pytest.raises(SealError):
        ring.open(ring.seal(b"datagram", b"udp"), b"tcp")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: b"",
        lambda s: s[: OVERHEAD - 1],
        lambda s: s[:-1],
        lambda s: s[:1] + bytes([s[1] ^ 1]) + s[2:],
        lambda s: s[:-1] + bytes([s[-1] ^ 0x80]),
        lambda s: bytes([2]) + s[1:],
        lambda s: b"\x01" + b"\x00" * 40,
    ],
    ids=["empty", "shorter-than-overhead", "truncated-tag", "flipped-nonce", "flipped-tag", "version", "zeros"],
)
def test_truncated_or_tampered_messages_raise_seal_error(mangle: object) -> None:
    ring = keyring(generate_key())
    sealed = ring.seal(b"payload of some length", AAD)
    with pytest.raises(SealError):
        ring.open(mangle(sealed), AAD)  # type: ignore[operator]


def test_every_key_opens_but_only_the_first_seals() -> None:
    old, new = generate_key(), generate_key()
    both = keyring(old, new)
    assert keyring(old).open(both.seal(b"x", AAD), AAD) == b"x"
    with pytest.raises(SealError):
        keyring(new).open(both.seal(b"x", AAD), AAD)
    assert both.open(keyring(new).seal(b"y", AAD), AAD) == b"y"


def test_key_file_lines_comments_and_errors(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "cluster.key"
    path.write_text(f"# the cluster key\n\n  {key}  \n")
    path.chmod(0o600)
    assert Keyring.load(path).keys == (decode_key(key),)
    path.write_text("not base64!\n")
    with pytest.raises(KeyringError, match="line 1"):
        Keyring.load(path)
    path.write_text(base64.b64encode(b"short").decode() + "\n")
    with pytest.raises(KeyringError, match="32 bytes"):
        Keyring.load(path)
    path.write_text("# nothing\n")
    with pytest.raises(KeyringError, match="no key"):
        Keyring.load(path)
    with pytest.raises(KeyringError, match="cannot read"):
        Keyring.load(tmp_path / "missing.key")


def test_a_readable_key_file_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(generate_key() + "\n")
    path.chmod(0o640)  # the documented root:gpu-agent 0640: group read is fine
    Keyring.load(path)
    assert "chmod" not in caplog.text
    path.chmod(0o644)
    Keyring.load(path)
    assert "chmod 640" in caplog.text


def test_rotation_keeps_the_files_mode_owner_and_group(tmp_path: Path) -> None:
    """A root-run rotation of root:gpu-agent 0640 must leave the agent able to read the file."""
    path = tmp_path / "cluster.key"
    old, new = generate_key(), generate_key()
    install_key(path, old)
    path.chmod(0o640)
    group = next((g for g in os.getgroups() if g != path.stat().st_gid), None)
    if os.geteuid() == 0 and group is None:
        group = path.stat().st_gid + 1  # root may give a file to any gid
    if group is not None:
        os.chown(path, -1, group)
    before = path.stat()
    install_key(path, new)
    use_key(path, new)
    remove_key(path, old)
    after = path.stat()
    assert after.st_ino != before.st_ino  # rewritten, not edited in place
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)


def test_a_chmod_alone_gets_the_key_file_re_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file unreadable when it changed is read again once a chmod/chown fixes it (same inode, mtime, size)."""
    path = tmp_path / "cluster.key"
    first, second = decode_key(generate_key()), decode_key(generate_key())
    write_keys(path, [first])
    watched = KeyringFile(path)
    write_keys(path, [second])

    def unreadable(cls: type[Keyring], _path: Path) -> Keyring:
        raise KeyringError("cannot read cluster key file: permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(Keyring, "load", classmethod(unreadable))
        assert watched.reload_if_changed() is False
    assert watched.keyring.primary == first
    changed = path.stat().st_ctime_ns
    while path.stat().st_ctime_ns == changed:  # ctime has the kernel's coarse clock: until it moves
        path.chmod(0o600)
    assert watched.reload_if_changed() is True
    assert watched.keyring.primary == second



def test_rotation_functions_rewrite_the_file_atomically_with_mode_600(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    old, new = generate_key(), generate_key()
    install_key(path, old)  # creates the file
    assert Keyring.load(path).keys == (decode_key(old),)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    install_key(path, new)
    assert Keyring.load(path).keys == (decode_key(old), decode_key(new))
    install_key(path, new)  # idempotent
    assert len(Keyring.load(path).keys) == 2
    with pytest.raises(KeyringError, match="primary"):
        remove_key(path, old)
    use_key(path, new)
    assert Keyring.load(path).primary == decode_key(new)
    remove_key(path, old)
    assert Keyring.load(path).keys == (decode_key(new),)
    with pytest.raises(KeyringError, match="not installed"):
        use_key(path, old)
    with pytest.raises(KeyringError, match="not in"):
        remove_key(path, old)
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.key"]  # no temporary file left


def test_keyring_file_reloads_on_change_and_keeps_keys_on_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    first, second = generate_key(), generate_key()
    write_keys(path, [decode_key(first)])
    watched = KeyringFile(path)
    assert not watched.reload_if_changed()
    install_key(path, second)
    assert watched.reload_if_changed()
    assert watched.keyring.keys == (decode_key(first), decode_key(second))
    path.write_text("garbage\n")
    assert not watched.reload_if_changed()
    assert watched.keyring.keys == (decode_key(first), decode_key(second))


def test_two_nodes_with_staggered_keyrings_keep_talking_through_a_rotation(tmp_path: Path) -> None:
    """The three-step rotation, each step applied to node A before node B.

    After every single file change, each node must still open what the other
    seals: that is what "rotation without downtime" means.
    """
    old, new = generate_key(), generate_key()
    files = {name: tmp_path / f"{name}.key" for name in "AB"}
    for path in files.values():
        install_key(path, old)
    nodes = {name: KeyringFile(path) for name, path in files.items()}

    def both_directions_work() -> None:
        for sender, receiver in (("A", "B"), ("B", "A")):
            nodes[sender].reload_if_changed()
            nodes[receiver].reload_if_changed()
            sealed = nodes[sender].keyring.seal(f"from {sender}".encode(), AAD)
            assert nodes[receiver].keyring.open(sealed, AAD) == f"from {sender}".encode()

    both_directions_work()
    for step in (install_key, use_key):
        for name in "AB":
            step(files[name], new)
            both_directions_work()
    for name in "AB":
        remove_key(files[name], old)
        both_directions_work()
    assert all(node.keyring.keys == (decode_key(new),) for node in nodes.values())
    # And the old key no longer opens anything.
    with pytest.raises(SealError):
        keyring(old).open(nodes["A"].keyring.seal(b"x", AAD), AAD)


def test_skipping_install_breaks_the_cluster_which_is_why_it_is_a_step(tmp_path: Path) -> None:
    """Using a key on A that B never installed cuts A off from B: the test above is not vacuous."""
    old, new = generate_key(), generate_key()
    a, b = keyring(new, old), keyring(old)
    with pytest.raises(SealError):
        b.open(a.seal(b"x", AAD), AAD)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate"]) == 0
    key = capsys.readouterr().out.strip()
    assert len(decode_key(key)) == 32
    path = tmp_path / "cluster.key"
    assert main(["install", str(path), key]) == 0
    assert main(["list", str(path)]) == 0
    assert "(primary)" in capsys.readouterr().out
    assert main(["remove", str(path), key]) == 1
    assert "primary" in capsys.readouterr().err
