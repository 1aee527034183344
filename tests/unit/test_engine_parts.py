"""The deploy run's parts, each driven directly with stand-ins: connecting with --wait, and settling the cluster key
from the members' snapshots (the lock and Ray's settlement: test_lock_fence.py, test_ray_plan.py)."""

import concurrent.futures
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.engine.cluster_key import CREATED, KEPT, ROTATED, new_cluster_key, settle_cluster_key
from flambe_iac.engine.connecting import connect_with_wait
from flambe_iac.remote_layout import CLUSTER_PUBLIC_KEY, RETIRED_KEYS
from flambe_iac.ssh.policy import SshPolicy


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class Host:
    def __init__(self, failures: list[str]):
        self.failures = failures

    def connect(self, show_errors, raise_exceptions):
        if self.failures:
            raise OSError(self.failures.pop(0))


class Entry:
    address = "10.0.0.1"
    connect_seconds = None
    error = None

    def fail(self, cause):
        self.error = cause


class View:
    def __init__(self):
        self.notes = []

    def note(self, entry, text):
        self.notes.append(text)

    @contextmanager
    def waiting_for(self, entry, what):
        yield


POLICY = SshPolicy("ubuntu", "/k", None, "/kh", 10)


def test_a_booting_host_is_waited_for_with_backoff_then_connects():
    clock, entry, view = Clock(), Entry(), View()
    host = Host(["Connection refused"] * 3)
    assert connect_with_wait(host, entry, 60, POLICY, view, clock=clock, sleep=clock.sleep)
    assert clock.now == 1 + 2 + 4 and len(view.notes) == 3 and entry.error is None


def test_waiting_ends_at_the_deadline_with_the_cause_and_how_long():
    clock, entry, view = Clock(), Entry(), View()
    assert not connect_with_wait(Host(["Connection refused"] * 99), entry, 20, POLICY, view, clock=clock,
                                 sleep=clock.sleep)
    assert "Connection refused" in entry.error and "waited 15 s for its sshd" in entry.error


def test_a_refused_key_or_host_key_is_never_waited_for():
    for failure in ("Authentication failed.", "Host key for server '10.0.0.1' does not match"):
        clock, entry = Clock(), Entry()
        assert not connect_with_wait(Host([failure] * 9), entry, 300, POLICY, View(), clock=clock, sleep=clock.sleep)
        assert clock.now == 0 and entry.error


def snapshot(public_line=None, retired=()):
    found = HostSnapshot()
    if public_line:
        found.contents[CLUSTER_PUBLIC_KEY] = public_line.encode() + b"\n"
    found.contents[RETIRED_KEYS] = "".join(f"{fingerprint}\n" for fingerprint in retired).encode()
    return found


def test_the_held_key_is_kept_when_a_member_hands_it_over():
    key = new_cluster_key("flambe-cluster:c1")
    fetched = []
    settled = settle_cluster_key({"o": snapshot(key.public_line), "f": snapshot(key.public_line)}, "o", False, "c1",
                                 lambda host: fetched.append(host) or key.private_openssh)
    assert settled.action == KEPT and settled.key.fingerprint == key.fingerprint and fetched == ["o"]


def test_a_key_no_member_can_hand_over_is_replaced_and_retired():
    key = new_cluster_key("flambe-cluster:c1")
    damaged = settle_cluster_key({"o": snapshot(key.public_line)}, "o", False, "c1", lambda host: b"garbage")
    assert damaged.action == ROTATED and damaged.key.fingerprint != key.fingerprint
    assert key.fingerprint in damaged.retired and "a new key replaces it" in damaged.note


def test_a_fresh_cluster_gets_a_new_key_and_a_rotation_retires_the_old():
    assert settle_cluster_key({"o": snapshot()}, "o", False, "c1", lambda host: None).action == CREATED
    key = new_cluster_key("flambe-cluster:c1")
    rotated = settle_cluster_key({"o": snapshot(key.public_line)}, "o", True, "c1", lambda host: key.private_openssh)
    assert rotated.action == ROTATED and key.fingerprint in rotated.retired
    assert rotated.key.fingerprint != key.fingerprint


def test_day_two_threads_asking_at_once_share_one_askpass_helper(monkeypatch):
    """exec, download and status reach their members from threads at once. With a passphrase, the first to ask
    writes the askpass helper; the others must get the same one, still there, never a second directory whose
    creation dropped (and deleted) the first."""
    made = []
    real = tempfile.TemporaryDirectory

    def slow_directory(*arguments, **options):
        time.sleep(0.05)  # as a busy disk would: another thread runs meanwhile
        directory = real(*arguments, **options)
        made.append(directory.name)
        return directory

    monkeypatch.setattr(tempfile, "TemporaryDirectory", slow_directory)
    policy = SshPolicy("ubuntu", "/k", "a passphrase", "/kh", 10)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            environments = list(pool.map(lambda _: policy.environment(), range(8)))
        helpers = {environment["SSH_ASKPASS"] for environment in environments}
        assert len(made) == 1 and len(helpers) == 1
        helper = Path(helpers.pop())
        assert helper.read_text().startswith("#!/bin/sh") and helper.stat().st_mode & 0o777 == 0o700
    finally:
        policy.close()
