"""Members that leave take no key with them: the manifests' members, read within the one snapshot, against the source.

The manifest excerpt is read by the real shell command of the snapshot, in a directory standing for the home."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flambe_iac.cluster import FACTORY, ORCHESTRATOR, Cluster, Host
from flambe_iac.deploys import cluster_key as cluster_key_step
from flambe_iac.engine.snapshot import HostSnapshot, parse_snapshot, snapshot_command
from flambe_iac.engine.steps import StepContext
from flambe_iac.engine import settlement
from flambe_iac.engine.cluster_key import CLUSTER_PUBLIC_KEY, KEPT, RETIRED_KEYS, ROTATED, new_cluster_key
from flambe_iac.engine.departures import (
    MANIFEST_EXCERPT,
    RecordedMember,
    departed_members,
    parse_manifest_excerpt,
)
from flambe_iac.remote_layout import manifest
from flambe_iac.engine.report import DeployReport
from flambe_iac.errors import InputError
from flambe_iac.inputs.plan import DeployRequest, build_plan
from flambe_iac.ssh.policy import ssh_config_block, updated_ssh_config

KEY = new_cluster_key("flambe-cluster:c1")
ORCH = Host("i-orch", ORCHESTRATOR, "10.0.0.1")
F1 = Host("i-f1", FACTORY, "10.0.0.2")
F2 = Host("i-f2", FACTORY, "10.0.0.3")
F3 = Host("i-f3", FACTORY, "10.0.0.4")  # the replacement of F2: a new id, a new address


def cluster(*factories):
    return Cluster("c1", "ubuntu", "lab", ORCH, tuple(factories))


def manifest_bytes(members, fingerprint=KEY.fingerprint, resources=None):
    return manifest("c1", ORCHESTRATOR, "i-orch", [{"id": m.id, "role": m.role, "private_ip": m.private_ip}
                                                    for m in members],
                    fingerprint, resources or {}, "0.1.0", {})


def snapshot_of(home: Path) -> HostSnapshot:
    """The cluster key step's part of the one snapshot, run by bash in HOME as the deploy runs it on a host."""
    result = subprocess.run(["bash", "-c", snapshot_command(cluster_key_step.READS)], cwd=home, capture_output=True,
                            timeout=60, check=True)
    lines = result.stdout.decode(errors="surrogateescape").splitlines()
    assert lines[-1] == "@end-of-snapshot"
    return parse_snapshot(lines[:-1])


def write_manifest(home: Path, data: bytes) -> None:
    (home / ".flambe").mkdir(parents=True, exist_ok=True)
    (home / ".flambe" / "cluster.json").write_bytes(data)


def test_the_snapshot_reads_the_members_and_key_of_a_large_manifest_without_its_checksums(tmp_path):
    # A resource named "members", and file names that spell the pattern: only the top-level key may match.
    files = {f'dir/"members":[{{"id":"i-evil","private_ip":"6.6.6.6"}}]{index}.bin': "a" * 64 for index in range(20000)}
    write_manifest(tmp_path, manifest_bytes([ORCH, F1, F2], resources={"members": files, "data": files}))
    assert (tmp_path / ".flambe" / "cluster.json").stat().st_size > 2_000_000
    snapshot = snapshot_of(tmp_path)
    excerpt = snapshot.excerpts[MANIFEST_EXCERPT]
    assert len(excerpt) < 400  # the two fields, not the megabytes of checksums
    recorded = parse_manifest_excerpt(excerpt)
    assert recorded.fingerprint == KEY.fingerprint
    assert recorded.members == {RecordedMember(h.id, h.private_ip) for h in (ORCH, F1, F2)}


def test_an_indented_manifest_of_an_earlier_version_is_read_too(tmp_path):
    document = json.loads(manifest_bytes([ORCH, F1]))
    write_manifest(tmp_path, json.dumps(document, indent=2).encode())
    recorded = parse_manifest_excerpt(snapshot_of(tmp_path).excerpts[MANIFEST_EXCERPT])
    assert recorded.members == {RecordedMember("i-orch", "10.0.0.1"), RecordedMember("i-f1", "10.0.0.2")}


def test_a_host_without_a_manifest_records_no_one(tmp_path):
    snapshot = snapshot_of(tmp_path)
    assert snapshot.excerpts[MANIFEST_EXCERPT] == b""
    assert parse_manifest_excerpt(snapshot.excerpts[MANIFEST_EXCERPT]) is None


@pytest.mark.parametrize("content", [
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b'{"members":' + b"[" * 100000,
    b'{"members":[' + b'{"id":"i-1","private_ip":"10.0.0.9"},' * 20000 + b"]}",  # longer than an excerpt: cut
    b'{"members":"everyone","cluster_key_fingerprint":7}',
])
def test_a_hostile_manifest_is_read_as_recording_no_one_never_a_crash(tmp_path, content):
    write_manifest(tmp_path, content)
    assert parse_manifest_excerpt(snapshot_of(tmp_path).excerpts[MANIFEST_EXCERPT]) is None


def test_recorded_entries_that_are_not_an_id_and_an_address_are_passed_over(tmp_path):
    members = [{"id": "i-ok", "private_ip": "10.0.0.7"}, {"id": "i-x\x1b[2J", "private_ip": "10.0.0.8"},
               {"id": "i-y;rm", "private_ip": "10.0.0.9"}, {"id": "i-z", "private_ip": "10.0.0.10%eth0"},
               {"id": 7, "private_ip": "10.0.0.11"}, "i-v", None]
    write_manifest(tmp_path, json.dumps({"cluster_key_fingerprint": "SHA256:$(reboot)", "members": members}).encode())
    recorded = parse_manifest_excerpt(snapshot_of(tmp_path).excerpts[MANIFEST_EXCERPT])
    assert recorded.members == {RecordedMember("i-ok", "10.0.0.7")}
    assert recorded.fingerprint is None


def member_snapshot(recorded_members, fingerprint=KEY.fingerprint, retired=()):
    found = HostSnapshot()
    found.contents[CLUSTER_PUBLIC_KEY] = KEY.public_line.encode() + b"\n"
    found.contents[RETIRED_KEYS] = "".join(f"{item}\n" for item in retired).encode()
    if recorded_members is not None:
        excerpt = json.loads(manifest_bytes(recorded_members, fingerprint))
        found.excerpts[MANIFEST_EXCERPT] = (f'"cluster_key_fingerprint":"{fingerprint}"\n'
                                            f'"members":{json.dumps(excerpt["members"])}\n').encode()
    return found


def test_a_replaced_member_has_left_and_an_added_one_leaves_no_one():
    before = [ORCH, F1, F2]
    snapshots = [member_snapshot(before), member_snapshot(before)]
    assert departed_members(snapshots, cluster(F1, F2)) == []
    assert departed_members(snapshots, cluster(F1, F2, F3)) == []  # adding a factory does not rotate (invariant 5)
    assert departed_members(snapshots + [member_snapshot(None)], cluster(F1, F3)) == [RecordedMember("i-f2",
                                                                                                     "10.0.0.3")]
    moved = Host("i-f2", FACTORY, "10.0.0.9")  # an old name on a new machine: the old machine left
    assert departed_members(snapshots, cluster(F1, moved)) == [RecordedMember("i-f2", "10.0.0.3")]


def test_members_recorded_with_a_retired_key_hold_nothing_that_still_opens_a_door():
    old = new_cluster_key("flambe-cluster:c1").fingerprint
    stale = member_snapshot([ORCH, F1, F2], fingerprint=old)  # a member the rotation's run did not finish on
    current = member_snapshot([ORCH, F1, F3], retired=[old])
    assert departed_members([stale, current], cluster(F1, F3)) == []


class Fleet:
    def __init__(self, plan):
        self.members = {member.id: member for member in plan.cluster.members}
        self.entries = {}

    def host_of(self, member):
        return member.id


def settle_with(monkeypatch, source, recorded, **flags):
    """One settlement of SOURCE's members, whose snapshots record RECORDED; returns (report, fetches of the key)."""
    fetched = []
    monkeypatch.setattr(settlement, "read_file", lambda host, path: fetched.append(host) or KEY.private_openssh)
    request = DeployRequest(outputs=Path("outputs.json"), **flags)
    plan = SimpleNamespace(request=request, cluster=source, autostop=45.0, resources=[], extension_trees=[],
                           extensions=[])
    context = SimpleNamespace(plan=plan, prepare_trees=lambda: None, key=None, retired=set())
    report = DeployReport("c1", [], run_id="run-1")
    snapshots = {member.id: member_snapshot(recorded) if member is not F3 else HostSnapshot()  # F3 is new
                 for member in source.members}
    settlement.settle(context, report, Fleet(plan), snapshots)
    return context, report, fetched


def test_a_member_that_left_rotates_the_key_and_the_report_names_it_and_says_why(monkeypatch):
    context, report, fetched = settle_with(monkeypatch, cluster(F1, F3), [ORCH, F1, F2])
    assert report.cluster_key_action == ROTATED and context.key.fingerprint != KEY.fingerprint
    assert KEY.fingerprint in context.retired  # never authorized again (invariant 10)
    assert report.departed_members == [{"id": "i-f2", "private_ip": "10.0.0.3", "holds_cluster_key": False}]
    note = " ".join(report.notes)
    assert "i-f2 (10.0.0.3)" in note and "left the stack outputs" in note and "rotated" in note
    assert "--keep-cluster-key" in note
    assert fetched == []  # a rotation fetches no old private key


def test_the_keep_flag_keeps_the_key_and_the_report_says_the_member_that_left_still_holds_it(monkeypatch):
    context, report, _ = settle_with(monkeypatch, cluster(F1, F3), [ORCH, F1, F2], keep_cluster_key=True)
    assert report.cluster_key_action == KEPT and context.key.fingerprint == KEY.fingerprint
    assert report.departed_members == [{"id": "i-f2", "private_ip": "10.0.0.3", "holds_cluster_key": True}]
    assert "STILL HOLD the cluster key" in " ".join(report.notes)
    assert "--rotate-cluster-key" in " ".join(report.notes)


def test_a_re_run_with_no_departure_keeps_the_key_at_no_extra_cost(monkeypatch):
    context, report, fetched = settle_with(monkeypatch, cluster(F1, F2), [ORCH, F1, F2])
    assert report.cluster_key_action == KEPT and report.departed_members == [] and report.notes == []
    assert fetched == ["i-orch"]  # one read of the key, as before: the members came in the snapshot already


def test_rotate_and_keep_together_are_bad_input():
    with pytest.raises(InputError, match="give one"):
        build_plan(DeployRequest(outputs=Path("outputs.json"), rotate_cluster_key=True, keep_cluster_key=True))


def test_every_member_loses_the_departed_members_pins_and_config_lines(tmp_path):
    pins = tmp_path / "known_hosts"
    pins.write_text("".join(f"{host.private_ip} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{host.id}\n"
                            for host in (ORCH, F1, F2, F3)))
    plan = SimpleNamespace(cluster=cluster(F1, F3), host_keys=SimpleNamespace(known_hosts=pins),
                           address=lambda member: member.private_ip)
    known = StepContext(plan, None, "run").members_known_hosts.decode()
    assert "10.0.0.3" not in known and "i-f2" not in known
    assert "10.0.0.4 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIi-f3\n" in known
    user_lines = b"Host example\n    User someone\r\n# mine\n"
    before = updated_ssh_config(user_lines, ssh_config_block("c1", "ubuntu", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                                "c1")
    after = updated_ssh_config(before, ssh_config_block("c1", "ubuntu", ["10.0.0.1", "10.0.0.2", "10.0.0.4"]), "c1")
    assert b"10.0.0.3" not in after and b"10.0.0.4" in after
    assert after.endswith(user_lines)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_any_bytes_from_a_host_are_read_as_members_or_as_no_one_never_a_crash(data):
    recorded = parse_manifest_excerpt(data)
    assert recorded is None or all(isinstance(member, RecordedMember) for member in recorded.members)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({"id": st.text(max_size=20), "private_ip": st.text(max_size=20)}), max_size=8),
       st.text(max_size=60))
def test_recorded_members_are_only_ever_valid_ids_and_addresses(entries, fingerprint):
    line = json.dumps({"members": entries, "cluster_key_fingerprint": fingerprint})[1:-1]
    recorded = parse_manifest_excerpt(line.encode())
    for member in recorded.members if recorded else ():
        assert member.id.isprintable() and " " not in member.id and " " not in member.private_ip
