"""Adversarial tests for the holes of issue 10: hostile names, a FIFO, a symlinked authorized_keys, and a rotation
that no later run can undo. Each checks the hosts themselves: authorized_keys lines, files, sshd logs."""

import json
import os
import signal
import time

import pytest
from lab_session import home_environment

from flambe_iac.engine.cluster_key import new_cluster_key
from flambe_iac.ssh.user_key import public_key_fingerprint

pytestmark = pytest.mark.lab

EVIL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostileHostileHostileHostileHostileHostile evil@attacker"


def outputs_with(lab, tmp_path, **changes):
    document = lab.outputs
    document.update(changes)
    path = tmp_path / "hostile-outputs.json"
    path.write_text(json.dumps(document))
    return path


HOSTILE_OUTPUTS = {
    "newline and a key in the cluster name": {"cluster_name": f"c1\n{EVIL_KEY}"},
    "path traversal in the cluster name": {"cluster_name": "../../../../tmp/x"},
    "a space in the cluster name": {"cluster_name": "my cluster"},
    "a command in ssh_user": {"ssh_user": "ubuntu;touch /tmp/pwned"},
    "a substitution in ssh_user": {"ssh_user": "$(touch /tmp/pwned)"},
    "a newline in ssh_user": {"ssh_user": "ubuntu\nroot"},
    "a hostile instance id": {"factories": [{"id": "i-1;reboot", "public_ip": "10.213.0.3",
                                             "private_ip": "10.213.0.3", "public_dns": None}]},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_OUTPUTS))
def test_hostile_names_are_bad_input_and_reach_no_host(lab, tmp_path, case):
    outputs = outputs_with(lab, tmp_path, **HOSTILE_OUTPUTS[case])
    before = lab.snapshot_hosts()
    trusting = ["--outputs", str(outputs), "--key", str(lab.user_key), "--trust-on-first-use"]
    arguments = trusting if "traversal" in case else \
        ["--outputs", str(outputs), "--key", str(lab.user_key), "--known-hosts", str(lab.known_hosts)]
    result = lab.deploy(*arguments, env=home_environment(tmp_path / "home"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not allowed" in result.stderr or "not a login name" in result.stderr
    assert lab.snapshot_hosts() == before  # no authorized_keys line, no file, not even a login in sshd's log
    assert not os.path.exists("/tmp/pwned")
    assert not (tmp_path / "home" / ".flambe").exists() or not any((tmp_path / "home").rglob("x"))


def test_a_newline_in_a_cluster_files_name_is_bad_input(lab, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(json.dumps({"name": f"c1\n{EVIL_KEY}", "orchestrator_ip": lab.addresses[0],
                                   "factories_ips": lab.addresses[1:], "username": lab.user}))
    before = lab.snapshot_hosts()
    result = lab.deploy("--cluster", str(cluster), "--key", str(lab.user_key), "--known-hosts", str(lab.known_hosts))
    assert result.returncode == 2 and "not allowed" in result.stderr, result.stderr
    assert lab.snapshot_hosts() == before


def test_a_fifo_in_a_resource_is_bad_input_and_never_hangs(lab, tmp_path):
    resource = tmp_path / "data"
    resource.mkdir()
    (resource / "ok.txt").write_text("fine\n")
    os.mkfifo(resource / "pipe")
    before = lab.snapshot_hosts()
    started = time.monotonic()
    result = lab.deploy(*lab.lab_arguments(), "--resource", f"data={resource}", timeout=30)
    assert result.returncode == 2, result.stderr
    assert "is a FIFO" in result.stderr and "pipe" in result.stderr
    assert time.monotonic() - started < 20
    assert lab.snapshot_hosts() == before


@pytest.mark.parametrize("value", ["-5", "0", "ten"])
def test_a_nonsense_connect_timeout_is_refused(lab, value):
    result = lab.deploy(*lab.lab_arguments(), "--connect-timeout", value)
    assert result.returncode == 2 and "connect-timeout" in result.stderr


def test_a_damaged_private_key_is_bad_input_before_connecting(lab, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END OPENSSH PRIVATE KEY-----\n")
    before = lab.snapshot_hosts()
    result = lab.deploy("--outputs", str(lab.directory / "outputs.json"), "--key", str(damaged),
                        "--known-hosts", str(lab.known_hosts))
    assert result.returncode == 2 and "damaged" in result.stderr, result.stderr
    assert lab.snapshot_hosts() == before


def test_a_symlinked_authorized_keys_stays_a_symlink_and_its_target_gets_the_key(fresh_lab, tmp_path):
    home = fresh_lab.home("factory-1")
    central = home / "central-keys"
    central.mkdir()
    os.chown(central, *owner(home))
    target = central / "ubuntu.keys"
    (home / ".ssh" / "authorized_keys").rename(target)
    (home / ".ssh" / "authorized_keys").symlink_to(f"/home/{fresh_lab.user}/central-keys/ubuntu.keys")
    result = fresh_lab.deploy(*fresh_lab.lab_arguments())
    assert result.returncode == 0, result.stdout + result.stderr
    assert (home / ".ssh" / "authorized_keys").is_symlink()
    lines = target.read_text().splitlines()
    assert lines[0] == (fresh_lab.user_key.with_suffix(".pub")).read_text().strip()
    assert any("flambe-cluster:" in line for line in lines)
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    # Revoking centrally still revokes: emptying the target locks the user key out.
    target.write_text("")
    assert fresh_lab.ssh(fresh_lab.addresses[1], "true").returncode != 0


def test_a_symlinked_authorized_keys_whose_target_is_not_writable_fails_that_host_only(fresh_lab, tmp_path):
    home = fresh_lab.home("factory-2")
    locked = home / "locked"
    locked.mkdir(mode=0o755)  # root's: the user cannot write into it
    target = locked / "keys"
    (home / ".ssh" / "authorized_keys").rename(target)
    os.chmod(target, 0o644)
    (home / ".ssh" / "authorized_keys").symlink_to(f"/home/{fresh_lab.user}/locked/keys")
    before = target.read_bytes()
    report = tmp_path / "report.json"
    result = fresh_lab.deploy(*fresh_lab.lab_arguments(), "--report", str(report))
    assert result.returncode == 1, result.stdout + result.stderr
    entries = {entry["address"]: entry for entry in json.loads(report.read_text())["hosts"]}
    failed = entries[fresh_lab.addresses[2]]
    assert "is a symlink to" in failed["error"] and "not writable" in failed["error"]
    assert (home / ".ssh" / "authorized_keys").is_symlink() and target.read_bytes() == before
    assert all(entries[address]["error"] is None for address in fresh_lab.addresses[:2])


def owner(path):
    info = path.stat()
    return info.st_uid, info.st_gid


def authorized_cluster_keys(lab, name):
    lines = (lab.home(name) / ".ssh" / "authorized_keys").read_text().splitlines()
    return {" ".join(line.split()[:2]) for line in lines if "flambe-cluster:" in line}


def held_key(lab, name):
    return " ".join((lab.home(name) / "ray_bootstrap_key.pub").read_text().split()[:2])


@pytest.mark.parametrize("down_host", ["orchestrator", "factory-2"])
def test_a_rotation_with_a_member_down_is_finished_by_the_next_plain_run_never_undone(fresh_lab, tmp_path,
                                                                                         down_host):
    assert fresh_lab.deploy(*fresh_lab.lab_arguments()).returncode == 0
    first_key = held_key(fresh_lab, "factory-1")
    pids = fresh_lab.sshd_pids(down_host)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        rotated = fresh_lab.deploy(*fresh_lab.lab_arguments(), "--rotate-cluster-key", "--wait", "0",
                                   "--connect-timeout", "2")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert rotated.returncode == 1, rotated.stdout + rotated.stderr
    second_key = held_key(fresh_lab, "factory-1")
    assert second_key != first_key and held_key(fresh_lab, down_host) == first_key

    # A plain run, from another machine (another HOME, nothing local), once the member is back.
    plain = fresh_lab.deploy(*fresh_lab.lab_arguments(), env=home_environment(tmp_path / "elsewhere"))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    for name in fresh_lab.hostnames:
        assert held_key(fresh_lab, name) == second_key
        assert authorized_cluster_keys(fresh_lab, name) == {second_key}  # the retired key is gone everywhere
    result = fresh_lab.ssh(fresh_lab.addresses[0], f"ssh -o BatchMode=yes {fresh_lab.addresses[2]} hostname")
    assert result.stdout.strip() == "factory-2", result.stderr


def test_a_retired_key_put_back_by_hand_is_refused_and_removed(fresh_lab, tmp_path):
    assert fresh_lab.deploy(*fresh_lab.lab_arguments()).returncode == 0
    old_private = (fresh_lab.home("orchestrator") / "ray_bootstrap_key.pem").read_bytes()
    old_public = (fresh_lab.home("orchestrator") / "ray_bootstrap_key.pub").read_bytes()
    assert fresh_lab.deploy(*fresh_lab.lab_arguments(), "--rotate-cluster-key").returncode == 0
    new_key = held_key(fresh_lab, "orchestrator")
    # Someone restores the old key pair on the orchestrator from a backup.
    (fresh_lab.home("orchestrator") / "ray_bootstrap_key.pem").write_bytes(old_private)
    (fresh_lab.home("orchestrator") / "ray_bootstrap_key.pub").write_bytes(old_public)
    result = fresh_lab.deploy(*fresh_lab.lab_arguments())
    assert result.returncode == 0, result.stdout + result.stderr
    for name in fresh_lab.hostnames:
        assert held_key(fresh_lab, name) == new_key
        assert authorized_cluster_keys(fresh_lab, name) == {new_key}


def test_a_compromised_factory_cannot_retire_the_users_key_or_an_admins(fresh_lab):
    """factory-1, compromised, lists the user's key and an admin's as retired cluster keys. Two plain deploys later,
    every member's authorized_keys still holds both lines, byte for byte: only lines flambe wrote are ever removed."""
    lab = fresh_lab
    admin = new_cluster_key("admin@ops").public_line  # any ed25519 key, with an admin's comment
    for name in lab.hostnames:
        with open(lab.home(name) / ".ssh" / "authorized_keys", "a") as keys:
            keys.write(admin + "\n")
    before = {name: (lab.home(name) / ".ssh" / "authorized_keys").read_bytes() for name in lab.hostnames}
    user_line = lab.user_key.with_suffix(".pub").read_text().strip()
    retired = lab.home("factory-1") / ".flambe" / "retired_cluster_keys"
    retired.parent.mkdir(exist_ok=True)
    retired.write_text("".join(f"{public_key_fingerprint(line)}\n" for line in (user_line, admin)))
    owner = lab.home("factory-1").stat()
    for path in (retired.parent, retired):  # the factory's own user wrote them
        os.chown(path, owner.st_uid, owner.st_gid)
    for _ in range(2):
        result = lab.deploy(*lab.lab_arguments())
        assert result.returncode == 0, result.stdout + result.stderr
    for name, address in zip(lab.hostnames, lab.addresses):
        now = (lab.home(name) / ".ssh" / "authorized_keys").read_bytes()
        assert users_lines(now) == users_lines(before[name]) and admin.encode() + b"\n" in now, name
        assert user_line.split()[1] in now.decode()
        assert lab.ssh(address, "true").returncode == 0  # the user still gets in


def users_lines(authorized_keys: bytes) -> list[bytes]:
    return [line for line in authorized_keys.splitlines(keepends=True) if b"flambe-cluster:" not in line]
