"""flambe-deploy against real sshd hosts: what lands on each host, and host-to-host SSH with the cluster key."""

import json
import os
import stat
import subprocess

import pytest
from conftest import CANARY_SECRETS

pytestmark = pytest.mark.lab


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def deploy_everything(lab, inputs, *extra):
    result = lab.deploy(*lab.lab_arguments(), "--secrets", str(inputs["secrets"]),
                        "--resource", f"data={inputs['resource']}", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def fingerprints(lab):
    return {lab.manifest(name)["cluster_key_fingerprint"]
            for name in lab.hostnames}


def test_every_host_gets_the_cluster_key_secrets_resources_and_manifest(fresh_lab, deploy_inputs, tmp_path):
    report_path = tmp_path / "report.json"
    deploy_everything(fresh_lab, deploy_inputs, "--report", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    public_keys = set()
    for name in fresh_lab.hostnames:
        home = fresh_lab.home(name)
        assert mode(home / "ray_bootstrap_key.pem") == 0o600
        assert mode(home / "ray_bootstrap_key.pub") == 0o644
        assert mode(home / ".ssh" / "authorized_keys") == 0o600
        assert mode(home / ".ssh" / "config") == 0o600
        assert mode(home / ".ssh" / "flambe_known_hosts") == 0o644
        assert mode(home / "secret.ini") == 0o600
        assert (home / "secret.ini").read_bytes() == CANARY_SECRETS
        assert (home / "resources" / "data" / "train.csv").read_text() == "a,b\n1,2\n"
        assert (home / "resources" / "data" / "nested" / "weights.bin").read_bytes() == bytes(range(256)) * 64
        public = (home / "ray_bootstrap_key.pub").read_text().strip()
        public_keys.add(public)
        assert public.endswith(f"flambe-cluster:{report['cluster_name']}")
        assert public in (home / ".ssh" / "authorized_keys").read_text()
        manifest = fresh_lab.manifest(name)
        assert manifest["cluster_key_fingerprint"] == report["cluster_key_fingerprint"]
        assert set(manifest["resources"]["data"]) == {"train.csv", "nested/weights.bin"}
        assert [member["private_ip"] for member in manifest["members"]] == fresh_lab.addresses
    assert len(public_keys) == 1
    private = {(fresh_lab.home(name) / "ray_bootstrap_key.pem").read_bytes() for name in fresh_lab.hostnames}
    assert len(private) == 1
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(fresh_lab.home("orchestrator") / "ray_bootstrap_key.pem")],
                             capture_output=True, text=True, check=True).stdout.split()[:2]
    assert derived == public_keys.pop().split()[:2]


def test_each_host_reaches_every_other_with_the_cluster_key_and_strict_host_keys(fresh_lab, deploy_inputs):
    deploy_everything(fresh_lab, deploy_inputs)
    for address in fresh_lab.addresses:
        others = [other for other in fresh_lab.addresses if other != address]
        # BatchMode: no prompt could hide a host key question; the member config alone must suffice.
        command = " && ".join(f"ssh -o BatchMode=yes {other} hostname" for other in others)
        result = fresh_lab.ssh(address, command)
        assert result.returncode == 0, result.stderr
        expected = [name for name, other in zip(fresh_lab.hostnames, fresh_lab.addresses) if other != address]
        assert result.stdout.split() == expected


def test_the_user_key_is_what_members_do_not_use(fresh_lab, deploy_inputs):
    """Host-to-host SSH works only through the cluster key: without it the member is refused."""
    deploy_everything(fresh_lab, deploy_inputs)
    first, second = fresh_lab.addresses[:2]
    result = fresh_lab.ssh(first, f"mv ~/ray_bootstrap_key.pem ~/moved.pem; ssh -o BatchMode=yes {second} true; "
                                  "status=$?; mv ~/moved.pem ~/ray_bootstrap_key.pem; exit $status")
    assert result.returncode == 255


def test_a_second_run_changes_nothing_and_keeps_the_key(fresh_lab, deploy_inputs, tmp_path):
    deploy_everything(fresh_lab, deploy_inputs)
    before = fingerprints(fresh_lab)
    snapshot = {name: (fresh_lab.home(name) / "ray_bootstrap_key.pem").stat().st_mtime_ns
                for name in fresh_lab.hostnames}
    report_path = tmp_path / "again.json"
    deploy_everything(fresh_lab, deploy_inputs, "--report", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["cluster_key_action"] == "kept"
    for host in report["hosts"]:
        requested = {name: step["status"] for name, step in host["steps"].items()
                     if name in ("cluster key", "secrets", "resources", "manifest")}
        assert requested == dict.fromkeys(requested, "unchanged") and len(requested) == 4, host
        assert {step["status"] for step in host["steps"].values()} == {"unchanged", "skipped"}
    assert fingerprints(fresh_lab) == before
    assert snapshot == {name: (fresh_lab.home(name) / "ray_bootstrap_key.pem").stat().st_mtime_ns
                        for name in fresh_lab.hostnames}


def test_a_changed_resource_is_synced_with_deletes(fresh_lab, deploy_inputs):
    deploy_everything(fresh_lab, deploy_inputs)
    (deploy_inputs["resource"] / "train.csv").unlink()
    (deploy_inputs["resource"] / "new.txt").write_text("new\n")
    deploy_everything(fresh_lab, deploy_inputs)
    for name in fresh_lab.hostnames:
        data = fresh_lab.home(name) / "resources" / "data"
        assert not (data / "train.csv").exists()
        assert (data / "new.txt").read_text() == "new\n"
        manifest = fresh_lab.manifest(name)
        assert set(manifest["resources"]["data"]) == {"new.txt", "nested/weights.bin"}


def test_a_file_edited_on_a_host_is_put_back(fresh_lab, deploy_inputs):
    deploy_everything(fresh_lab, deploy_inputs)
    tampered = fresh_lab.home("factory-1") / "resources" / "data" / "train.csv"
    tampered.write_text("tampered, longer than before\n")
    deploy_everything(fresh_lab, deploy_inputs)
    assert tampered.read_text() == "a,b\n1,2\n"


def test_adding_a_factory_gives_it_the_existing_key_without_rotating(fresh_lab, deploy_inputs, tmp_path):
    smaller = fresh_lab.outputs_with(tmp_path / "two.json", 2)
    result = fresh_lab.deploy(*fresh_lab.lab_arguments(smaller))
    assert result.returncode == 0, result.stderr
    original = (fresh_lab.home("orchestrator") / "ray_bootstrap_key.pem").read_bytes()
    assert not (fresh_lab.home("factory-2") / "ray_bootstrap_key.pem").exists()

    deploy_everything(fresh_lab, deploy_inputs)
    for name in fresh_lab.hostnames:
        assert (fresh_lab.home(name) / "ray_bootstrap_key.pem").read_bytes() == original
    result = fresh_lab.ssh(fresh_lab.addresses[2], f"ssh -o BatchMode=yes {fresh_lab.addresses[0]} hostname")
    assert result.stdout.strip() == "orchestrator", result.stderr


def test_rotation_replaces_the_key_everywhere_and_removes_the_old_one(fresh_lab, deploy_inputs, tmp_path):
    deploy_everything(fresh_lab, deploy_inputs)
    old_public = (fresh_lab.home("orchestrator") / "ray_bootstrap_key.pub").read_text().split()[1]
    user_lines = {name: (fresh_lab.home(name) / ".ssh" / "authorized_keys").read_bytes().splitlines(keepends=True)[0]
                  for name in fresh_lab.hostnames}
    report_path = tmp_path / "rotated.json"
    deploy_everything(fresh_lab, deploy_inputs, "--rotate-cluster-key", "--report", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["cluster_key_action"] == "rotated"
    for name in fresh_lab.hostnames:
        authorized = (fresh_lab.home(name) / ".ssh" / "authorized_keys").read_bytes()
        assert old_public.encode() not in authorized
        new_public = (fresh_lab.home(name) / "ray_bootstrap_key.pub").read_text().split()[1]
        assert new_public != old_public
        assert new_public.encode() in authorized
        lines = authorized.splitlines(keepends=True)
        assert lines[0] == user_lines[name]
        assert len(lines) == 2
    assert fingerprints(fresh_lab) == {report["cluster_key_fingerprint"]}
    result = fresh_lab.ssh(fresh_lab.addresses[1], f"ssh -o BatchMode=yes {fresh_lab.addresses[2]} hostname")
    assert result.stdout.strip() == "factory-2", result.stderr


def test_other_authorized_keys_lines_stay_byte_identical(fresh_lab, deploy_inputs):
    authorized = fresh_lab.home("factory-1") / ".ssh" / "authorized_keys"
    original = authorized.read_bytes()
    extra = (b"# a comment the user keeps\r\n"
             b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDeadBeefDeadBeefDeadBeefDeadBeefDeadBeefDeadB other@cluster")
    authorized.write_bytes(original + extra)  # CRLF and no newline at the end, on purpose
    deploy_everything(fresh_lab, deploy_inputs)
    deploy_everything(fresh_lab, deploy_inputs, "--rotate-cluster-key")
    after = authorized.read_bytes()
    assert after.startswith(original + extra)
    assert after.count(b"flambe-cluster:") == 1


def test_user_ssh_config_is_kept_and_the_block_is_not_duplicated(fresh_lab, deploy_inputs):
    config = fresh_lab.home("orchestrator") / ".ssh" / "config"
    config.write_text("ServerAliveInterval 30\n\nHost example\n    User someone\n")
    os.chown(config, fresh_lab.state["uid"], fresh_lab.state["uid"])
    deploy_everything(fresh_lab, deploy_inputs)
    deploy_everything(fresh_lab, deploy_inputs, "--rotate-cluster-key")
    text = config.read_text()
    assert text.count("# BEGIN flambe cluster") == 1
    assert text.endswith("ServerAliveInterval 30\n\nHost example\n    User someone\n")
    result = fresh_lab.ssh(fresh_lab.addresses[0], f"ssh -o BatchMode=yes {fresh_lab.addresses[1]} hostname")
    assert result.stdout.strip() == "factory-1", result.stderr


def test_own_hosts_from_a_flambe_cluster_file(fresh_lab, deploy_inputs, tmp_path):
    cluster_file = tmp_path / "cluster.yaml"
    addresses = fresh_lab.addresses
    cluster_file.write_text(
        "!SSHCluster\nname: my-own-hosts\n"
        f"orchestrator_ip: [{addresses[0]}, {addresses[0]}]\n"
        f"factories_ips: [{addresses[1]}, [{addresses[2]}, {addresses[2]}]]\n"
        f"key: {fresh_lab.user_key}\nusername: {fresh_lab.user}\n")
    result = fresh_lab.deploy("--cluster", str(cluster_file), "--known-hosts", str(fresh_lab.known_hosts),
                              "--secrets", str(deploy_inputs["secrets"]))
    assert result.returncode == 0, result.stdout + result.stderr
    for name in fresh_lab.hostnames:
        manifest = fresh_lab.manifest(name)
        assert manifest["cluster_name"] == "my-own-hosts"
        assert (fresh_lab.home(name) / ".ssh" / "authorized_keys").read_text().count("flambe-cluster:my-own-hosts") == 1


def test_stack_outputs_through_the_pulumi_cli(fresh_lab, deploy_inputs, tmp_path):
    """--stack runs `pulumi stack output --json` (secrets only when an output is one); a stub pulumi on PATH answers
    with the lab."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "pulumi"
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/pulumi-arguments\ncat {fresh_lab.directory}/outputs.json\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = fresh_lab.deploy("--stack", "dev", "--key", str(fresh_lab.user_key), "--known-hosts",
                              str(fresh_lab.known_hosts), "--secrets", str(deploy_inputs["secrets"]), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "pulumi-arguments").read_text().split() == ["stack", "output", "--json", "--stack", "dev"]
    assert (fresh_lab.home("factory-2") / "secret.ini").read_bytes() == CANARY_SECRETS


def test_each_host_is_reached_over_one_connection(fresh_lab, deploy_inputs):
    """Commands, uploads, the lock and rsync all ride one authenticated connection per host (ssh/master.py): each
    sshd accepts this machine's key once per deploy, first run and re-run alike, and no master outlives the run."""
    client = fresh_lab.state["client_address"]

    def accepted() -> dict:
        return {name: fresh_lab.sshd_log(name).count(f"Accepted publickey for {fresh_lab.user} from {client} ")
                for name in fresh_lab.hostnames}

    for _ in ("first run", "re-run"):
        before = accepted()
        deploy_everything(fresh_lab, deploy_inputs, "--fan-out", "direct")
        assert {name: count - before[name] for name, count in accepted().items()} == dict.fromkeys(
            fresh_lab.hostnames, 1)
    masters = subprocess.run(["pgrep", "-f", "ControlMaster=yes.*flambe-deploy-"], capture_output=True, text=True)
    assert masters.stdout == ""
