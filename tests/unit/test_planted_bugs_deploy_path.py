"""Bugs planted in the deploy path that survived every test (issue 31), each attacked where a user would lose:
a factory waiting on an unchanged server, a CDPATH hashing another directory, a missing manifest vouching for a
damaged copy, a public address with 2 EFA interfaces, a lost lock leaving rsyncs running, a reused pid's process
group killed by --force, a group-writable cache directory."""

import hashlib
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import gevent
import pytest

from flambe_iac.deploys import operations
from flambe_iac.deploys.operations import RecordedResources, Transfer, synced_tree
from flambe_iac.ssh.processes import spawn_and_wait, stop_children
from flambe_iac.deploys.runnable import detached_run
from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.engine.fan_out import RELAY, FanOut, Hop
from flambe_iac.engine.lock import ClusterLock
from flambe_iac.remote_layout import RUN_PID
from flambe_iac.engine.remote_probes import checksums_command, parse_checksums
from flambe_iac.inputs.checksum_cache import ChecksumCache, cached_checksums
from flambe_iac.inputs.tree_listing import walk_tree

DESTINATION = "resources/data"


class ServingFanOut(FanOut):
    """A fan-out whose hops succeed at once, recording who served."""

    def hop(self, server, hop, last, by_contents=False):
        gevent.sleep(0.01)
        return 0, ""


def transfer_for(tmp_path: Path, member: str, fan_out=None, **fields) -> Transfer:
    tree = tmp_path / "data"
    tree.mkdir(exist_ok=True)
    (tree / "weights.bin").write_bytes(b"weights")
    return Transfer(destination=DESTINATION, expected=walk_tree(tree), rsync=None, fan_out=fan_out, member=member,
                    **fields)


def test_an_unchanged_server_serves_a_factory_added_later_without_waiting_for_its_whole_run(tmp_path):
    """(g) The orchestrator's copy is already right (nothing to send): it must say so, or a new factory waits for the
    orchestrator's whole run, is told "relay unavailable" and takes the tree across the uplink again."""
    fan_out = ServingFanOut(["orchestrator", "factory-1"], {DESTINATION: RELAY})
    unchanged = transfer_for(tmp_path, "orchestrator", fan_out, checksums={"weights.bin": "0" * 64}, vouched=True)
    snapshot = HostSnapshot(trees={DESTINATION: unchanged.expected.summary})
    notes = []
    factory = gevent.spawn(fan_out.take, DESTINATION, "factory-1", Hop(DESTINATION, "ubuntu", "10.0.0.2", 10), notes)
    assert list(synced_tree._inner(unchanged, {}, notes, snapshot)) == []  # nothing to do on the orchestrator
    served = factory.get(timeout=2)  # the orchestrator's run goes on (other steps): the factory must not wait for it
    assert served == ("orchestrator", 0, "") and notes == []


def test_a_cdpath_on_the_host_never_sends_the_check_to_another_directory(tmp_path):
    """(h) `cd resources/data` follows CDPATH before the home: the check would hash the attacker's copy."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    for root, content in ((home, b"the deployed copy"), (elsewhere, b"another directory")):
        (root / DESTINATION).mkdir(parents=True)
        (root / DESTINATION / "weights.bin").write_bytes(content)
    result = subprocess.run(["bash", "-c", checksums_command(DESTINATION)], cwd=home, capture_output=True,
                            env={**os.environ, "HOME": str(home), "CDPATH": str(elsewhere)}, check=True)
    assert parse_checksums(result.stdout) == {"weights.bin": hashlib.sha256(b"the deployed copy").hexdigest()}


@pytest.mark.parametrize("recorded", [None, {"another-resource": {"weights.bin": "0" * 64}}],
                         ids=["no manifest", "no entry for this resource"])
def test_a_manifest_that_records_nothing_for_a_resource_never_vouches_for_its_old_files(tmp_path, monkeypatch,
                                                                                       recorded):
    """(i) A first run that failed mid-copy leaves a damaged file with an old ctime and no manifest: the check after
    the next transfer must hash every file, not only those written since the read."""
    manifest = RecordedResources()
    manifest.read, manifest.resources = True, recorded
    transfer = transfer_for(tmp_path, "orchestrator", checksums={"weights.bin": "a" * 64}, vouched=False,
                            recorded_as="data", recorded=manifest)
    checks = []
    monkeypatch.setattr(operations, "fetched_copy", lambda host, transfer, notes: (None, None))
    monkeypatch.setattr(operations, "verify_tree",
                        lambda host, transfer, since, also: checks.append((since, list(also))))
    assert operations._transfer_tree(None, SimpleNamespace(name="h0"), transfer, 1_000, {}, [])
    assert checks == [(None, [])]  # None: every file is hashed, whatever its ctime


def test_the_public_address_is_refused_with_exactly_two_efa_interfaces():
    """(j) EC2 gives no public address at launch to an instance with more than one interface; 54 types have 2."""
    from flambe_iac.stacks.cluster_config import StackConfigError
    from flambe_iac.stacks.placement import efa_interface_count
    config = SimpleNamespace(efa=True, associate_public_ip=True)
    kind = SimpleNamespace(efa_supported=True, efa_maximum_interfaces=2, maximum_network_cards=2)
    kinds = {"g6.48xlarge": kind}
    with pytest.raises(StackConfigError, match="associatePublicIp false"):
        efa_interface_count(config, ["g6.48xlarge"], kinds)
    assert efa_interface_count(SimpleNamespace(efa=True, associate_public_ip=False), ["g6.48xlarge"], kinds) == 2


class TakenAwayLock:
    def __init__(self):
        self.taken_away = False


def test_a_lost_lock_stops_the_rsyncs_already_under_way():
    """(k) The fence holds for transfers that started before the lock was lost: the watch stops them."""
    held = TakenAwayLock()
    lock = ClusterLock(SimpleNamespace(entries={"h0": SimpleNamespace(address="10.0.0.3")}), 0, None)
    lock.held["h0"] = held
    transfer = gevent.spawn(spawn_and_wait, ["sleep", "30"], None)  # a long rsync under way
    watch = gevent.spawn(lock.watch, stop_children, every=0.05)
    try:
        gevent.sleep(0.3)
        assert not transfer.ready()
        held.taken_away = True
        started = time.monotonic()
        returncode, _ = transfer.get(timeout=5)
        assert returncode < 0 and time.monotonic() - started < 2
        assert watch.dead
    finally:
        watch.kill()
        stop_children()
        transfer.kill()


def test_force_never_kills_the_process_group_of_a_program_that_reused_the_runnables_pid(tmp_path):
    """(l) The runnable ended long ago; its pid now belongs to a program of the user's, leader of its own group:
    `--run --force` must leave that group alone."""
    home = tmp_path / "home"
    (home / ".flambe").mkdir(parents=True)
    unrelated = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (home / RUN_PID).write_text(f"{unrelated.pid}\n")
        command = next(detached_run._inner(force=True, python="true", environment={})).get_raw_value()
        subprocess.run(["sh", "-c", command], cwd=home, env={**os.environ, "HOME": str(home)}, check=True,
                       timeout=20)
        time.sleep(0.2)
        assert unrelated.poll() is None, "the user's process was killed"
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_cache_in_a_group_writable_directory_is_not_used(tmp_path):
    """(m) A member of the group could swap the cache's file for one of their own digests."""
    tree = tmp_path / "data"
    tree.mkdir()
    (tree / "weights.bin").write_bytes(b"weights")
    shared = tmp_path / "dot-flambe"
    shared.mkdir()
    shared.chmod(0o770)
    cache = ChecksumCache(shared / "checksums.sqlite")
    hashed = []

    def hash_files(function, items):
        items = list(items)
        hashed.extend(items)
        return map(function, items)
    cached_checksums(tree, tree, walk_tree(tree).files, cache, hash_files=hash_files)
    assert not cache.path.exists() and hashed
