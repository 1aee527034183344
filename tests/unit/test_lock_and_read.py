"""The state read rides the deploy lock's round trip (engine/lock.py): the real lock command, in bash on a home
here, prints LOCKED, then the read, then holds; a second deploy meets BUSY meanwhile; a hostile answer is bounded."""

from types import SimpleNamespace

import pytest

from flambe_iac.engine.snapshot import (
    SnapshotError,
    SnapshotRequest,
    parse_snapshot,
    snapshot_after_lock,
    snapshot_command,
)
from flambe_iac.engine.lock import BUSY, LOCKED, NO_LOCK, ask_member, deploy_lock_command
from flambe_iac.ssh.channel import HeldCommand, RemoteCommandError


class LocalHome:
    """A host's one connection whose sessions run in bash, in HOME on this machine."""

    def __init__(self, home):
        self.home, self.alive = home, True

    def command_argv(self, command: str) -> list[str]:
        return ["bash", "-c", f"cd {self.home} && {command}"]


def held(home, then: str = "", timeout: float = 5.0) -> HeldCommand:
    host = SimpleNamespace(connector=SimpleNamespace(connection=LocalHome(home)))
    return HeldCommand(host, deploy_lock_command(".flambe/deploy.lock", then), b"tester@here\n", timeout)


def test_once_locked_the_read_follows_in_the_same_session_and_the_lock_holds(tmp_path):
    (tmp_path / "secret.ini").write_text("[aws]\n")
    request = SnapshotRequest(files=("secret.ini",), contents=(".flambe/cluster.json",))
    first = held(tmp_path, snapshot_command(request))
    try:
        assert first.first_line == LOCKED.encode()
        snapshot = snapshot_after_lock(first, timeout=5)
        assert snapshot.files["secret.ini"][0] == "644" and snapshot.clock is not None
        second = held(tmp_path, snapshot_command(request))
        assert second.first_line == BUSY.encode() and b"tester@here" in second.rest_of_output(timeout=2)
        second.release()
        assert not first.taken_away
    finally:
        first.release()


def test_a_read_that_reads_input_gets_none_and_never_eats_the_heartbeat(tmp_path):
    lock = held(tmp_path, "cat; echo @end-of-snapshot")
    try:
        assert lock.read_through(b"@end-of-snapshot", 4096, timeout=3) == b"@end-of-snapshot\n"
        assert not lock.taken_away
    finally:
        lock.release()


def test_a_hostile_answer_after_the_lock_is_bounded_in_bytes_and_time(tmp_path):
    flood = held(tmp_path, "yes @not-the-end")
    try:
        with pytest.raises(RemoteCommandError, match="passed 65536 bytes"):
            flood.read_through(b"@end-of-snapshot", 65536, timeout=5)
    finally:
        flood.release()
    (tmp_path / "other").mkdir()
    silent = held(tmp_path / "other", "sleep 30")
    try:
        with pytest.raises(SnapshotError, match="no answer within 0.5 s"):
            snapshot_after_lock(silent, timeout=0.5)
    finally:
        silent.release()


@pytest.mark.parametrize("answer", [b"", b"Connection to host closed", b"\x1b[31mwelcome"])
def test_only_an_exact_no_lock_lets_a_deploy_go_on_unguarded(answer):
    """A shell that died or a ForceCommand answers something else: never a reason to deploy without the lock."""
    lock = SimpleNamespace(first_line=answer, release=lambda: None)
    outcome = ask_member(lambda budget: lock, "10.0.0.5", 5.0, 5.0, clock=lambda: 0.0)
    assert outcome.alone and "could not take the deploy lock on 10.0.0.5" in outcome.alone and not outcome.note
    unguarded = ask_member(lambda budget: SimpleNamespace(first_line=NO_LOCK.encode(), release=lambda: None),
                           "10.0.0.5", 5.0, 5.0, clock=lambda: 0.0)
    assert unguarded.note and not unguarded.alone


def test_the_state_reads_checksums_with_the_one_parser_and_refuses_one_that_is_not_a_sha256():
    digest = "ab" * 32
    read = parse_snapshot(["@file 81a4 600 secret.ini", f"@sha {digest}  secret.ini",
                           "@file 81a4 644 a\\b", f"@sha \\{digest}  a\\\\b"])  # sha256sum escapes a backslash
    assert read.files == {"secret.ini": ("600", digest), "a\\b": ("644", digest)}
    for hostile in ("@sha " + "g" * 64 + "  secret.ini", "@sha ../../etc/passwd", f"@sha {digest[:-1]}  secret.ini",
                    f"@sha {digest.upper()}  secret.ini"):
        with pytest.raises(SnapshotError, match="malformed line"):
            parse_snapshot(["@file 81a4 600 secret.ini", hostile])
