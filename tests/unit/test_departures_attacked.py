"""Members that left, attacked: what they may hold besides the cluster key, and who got the key when no manifest says.

Ray's token authenticates every client of the cluster's Ray (jobs run code on every member as the SSH user): a
departed member on the same network that kept it is not refused by Ray when only sshd refuses it, and a deploy
that rotates only the key says so. The manifest is written at a run's end: the members' pins, written with the key,
name who got it in a run that failed before."""

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_departed_members import Fleet

from flambe_iac.cluster import FACTORY, ORCHESTRATOR, Cluster, Host
from flambe_iac.deploys import cluster_key as cluster_key_step
from flambe_iac.engine.snapshot import parse_snapshot, snapshot_command
from flambe_iac.engine import ray_settlement, settlement
from flambe_iac.engine.cluster_key import KEPT, ROTATED, new_cluster_key
from flambe_iac.engine.ray_cluster import RAY_TOKEN
from flambe_iac.engine.departures import (
    MANIFEST_EXCERPT,
    RecordedMember,
    departed_members,
    parse_manifest_excerpt,
)
from flambe_iac.remote_layout import CLUSTER_PUBLIC_KEY, MANIFEST, MEMBERS_KNOWN_HOSTS, RETIRED_KEYS, manifest
from flambe_iac.engine.report import DeployReport
from flambe_iac.inputs.plan import DeployRequest

KEY = new_cluster_key("flambe-cluster:c1")
ORCH = Host("i-orch", ORCHESTRATOR, "10.0.0.1")
F1 = Host("i-f1", FACTORY, "10.0.0.2")
F2 = Host("i-f2", FACTORY, "10.0.0.3")  # it leaves


def home_of_a_member(root: Path, with_ray_token: bool) -> Path:
    """A member's home as the last run (of ORCH, F1, F2) left it, with Ray's token if that run had --ray."""
    home = root / ("ray" if with_ray_token else "plain")
    (home / ".flambe").mkdir(parents=True)
    (home / ".ssh").mkdir()
    (home / ".flambe" / "cluster.json").write_bytes(manifest(
        "c1", FACTORY, "i-f1", [{"id": m.id, "role": m.role, "private_ip": m.private_ip} for m in (ORCH, F1, F2)],
        KEY.fingerprint, {}, "0.1.0", {}))
    (home / CLUSTER_PUBLIC_KEY).parent.mkdir(parents=True, exist_ok=True)
    (home / CLUSTER_PUBLIC_KEY).write_text(KEY.public_line + "\n")
    if with_ray_token:
        token = home / RAY_TOKEN
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text("0123456789abcdef" * 4)
        token.chmod(0o600)
    assert (home / MANIFEST).is_file()
    return home


def snapshot_of(home: Path):
    """The cluster key step's part of the one snapshot, run by bash in HOME as the deploy runs it on a host."""
    result = subprocess.run(["bash", "-c", snapshot_command(cluster_key_step.READS)], cwd=home, capture_output=True,
                            timeout=60, check=True)
    lines = result.stdout.decode(errors="surrogateescape").splitlines()
    return parse_snapshot(lines[:-1])


@dataclass
class Plan:
    request: DeployRequest
    cluster: Cluster
    autostop: float = 45.0
    resources: list = field(default_factory=list)
    extension_trees: list = field(default_factory=list)
    extensions: list = field(default_factory=list)


def settle_after_f2_left(monkeypatch, tmp_path, with_ray_token, **flags):
    return settle_with_snapshot(monkeypatch, snapshot_of(home_of_a_member(tmp_path, with_ray_token)), **flags)


def settle_with_snapshot(monkeypatch, snapshot, **flags):
    """One settlement of a source without F2, every member's snapshot SNAPSHOT; returns the report."""
    monkeypatch.setattr(settlement, "read_file", lambda host, path: KEY.private_openssh)
    monkeypatch.setattr(settlement, "settle_ray", lambda *arguments: None)  # Ray's own settlement is not the point
    source = Cluster("c1", "ubuntu", "lab", ORCH, (F1,))
    plan = Plan(DeployRequest(outputs=Path("outputs.json"), **flags), source)
    context = SimpleNamespace(plan=plan, prepare_trees=lambda: None, key=None, retired=set())
    report = DeployReport("c1", [], run_id="run-1")
    settlement.settle(context, report, Fleet(plan), {member.id: snapshot for member in source.members})
    return report


def test_a_rotation_without_ray_says_the_member_that_left_may_still_reach_ray_with_its_token(monkeypatch, tmp_path):
    report = settle_after_f2_left(monkeypatch, tmp_path, with_ray_token=True)
    assert report.cluster_key_action == ROTATED
    note = " ".join(report.notes)
    assert "i-f2 (10.0.0.3)" in note and "Ray's token on the members was not replaced" in note
    assert "flambe-deploy ... --ray --rotate-cluster-key" in note


def test_the_kept_key_with_ray_says_the_ray_token_was_kept_too(monkeypatch, tmp_path):
    report = settle_after_f2_left(monkeypatch, tmp_path, with_ray_token=True, keep_cluster_key=True, ray=True,
                                  ray_python="python3")
    assert report.cluster_key_action == KEPT and "Ray's token on the members was not replaced" in " ".join(report.notes)


@pytest.mark.parametrize("with_ray_token, flags", [(False, {}), (True, {"ray": True, "ray_python": "python3"})])
def test_no_word_of_ray_where_no_token_stays_behind(monkeypatch, tmp_path, with_ray_token, flags):
    """No token on the members (Ray never ran), or a rotation with --ray (a new token): nothing to say."""
    report = settle_after_f2_left(monkeypatch, tmp_path, with_ray_token, **flags)
    assert report.cluster_key_action == ROTATED and "i-f2" in " ".join(report.notes)
    assert "Ray's token on the members" not in " ".join(report.notes)


def test_the_token_is_read_by_its_digest_never_its_bytes():
    assert RAY_TOKEN in cluster_key_step.READS.files and RAY_TOKEN not in cluster_key_step.READS.contents
    assert ray_settlement.RAY_TOKEN == RAY_TOKEN


def test_a_member_that_got_the_key_in_a_run_that_failed_before_any_manifest_still_rotates_it(monkeypatch, tmp_path):
    """The first run handed the key to ORCH, F1 and F2 and failed at a later step on every host (a setup command's
    typo): no manifest says who got the key. F2 is then left out of the source: its pin, written with the key, says
    it was a member."""
    home = home_of_a_member(tmp_path, with_ray_token=False)
    (home / MANIFEST).unlink()
    (home / MEMBERS_KNOWN_HOSTS).write_text("".join(f"{host.private_ip} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{n}\n"
                                                    for n, host in enumerate((ORCH, F1, F2))))
    report = settle_with_snapshot(monkeypatch, snapshot_of(home))
    assert report.cluster_key_action == ROTATED
    assert report.departed_members == [{"id": "", "private_ip": "10.0.0.3", "holds_cluster_key": False}]
    assert "left the stack outputs: 10.0.0.3." in " ".join(report.notes)


def test_pins_of_the_members_the_source_lists_are_no_departure(monkeypatch, tmp_path):
    home = home_of_a_member(tmp_path, with_ray_token=False)
    (home / MANIFEST).unlink()
    (home / MEMBERS_KNOWN_HOSTS).write_text("10.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI1\n"
                                            "10.0.0.2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI2\n"
                                            "\x1b[2J ssh-ed25519 AAAA\n|1|hashed= ssh-ed25519 AAAA\n\n")
    report = settle_with_snapshot(monkeypatch, snapshot_of(home))
    assert report.cluster_key_action == KEPT and report.departed_members == [] and report.notes == []


def test_pins_left_on_a_host_whose_key_was_retired_rotate_nothing_again(monkeypatch, tmp_path):
    """A rotation that failed on one host left its old key and its old pins there; the others retired that key. The
    stale pins open nothing: the next run does not rotate again (nor would any run after, while that host fails)."""
    home = home_of_a_member(tmp_path, with_ray_token=False)
    (home / MANIFEST).unlink()
    (home / MEMBERS_KNOWN_HOSTS).write_text("10.0.0.3 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI3\n")
    other = tmp_path / "other"
    for path in (CLUSTER_PUBLIC_KEY, RETIRED_KEYS):
        (other / path).parent.mkdir(parents=True, exist_ok=True)
    (other / CLUSTER_PUBLIC_KEY).write_text(new_cluster_key("flambe-cluster:c1").public_line + "\n")
    (other / RETIRED_KEYS).write_text(KEY.fingerprint + "\n")
    stale, rotated = snapshot_of(home), snapshot_of(other)
    source = Cluster("c1", "ubuntu", "lab", ORCH, (F1,))
    assert departed_members([stale, rotated], source) == []
    assert departed_members([stale], source) == [RecordedMember("", "10.0.0.3")]  # alone, its key is not retired


def test_the_members_of_a_manifest_of_4096_members_are_read_whole(tmp_path):
    """4096 members (departures.MAX_RECORDED_MEMBERS) take 300 KiB of the manifest: an excerpt cut shorter than
    that reads as recording no one, and a member that left would go unnoticed."""
    home = home_of_a_member(tmp_path, with_ray_token=False)
    members = [{"id": f"i-{index:017x}", "role": FACTORY, "private_ip": f"10.1.{index // 256}.{index % 256}"}
               for index in range(4096)]
    (home / MANIFEST).write_bytes(manifest("c1", FACTORY, "i-f1", members, KEY.fingerprint, {}, "0.1.0", {}))
    recorded = parse_manifest_excerpt(snapshot_of(home).excerpts.get(MANIFEST_EXCERPT))
    assert recorded is not None and len(recorded.members) == 4096 and recorded.fingerprint == KEY.fingerprint
