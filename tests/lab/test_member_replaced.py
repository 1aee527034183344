"""A factory replaced by a new host (a new address, a new host key) while the old one keeps running, as a host dropped
from a cluster file or an instance replaced by hand does: one deploy brings the new member in, every member forgets
the old one, and the old one's copy of the cluster key opens no door any more."""

import json
import os

import pytest
from conftest import CANARY_SECRETS

pytestmark = pytest.mark.lab

USER_CONFIG = b"ServerAliveInterval 30\r\n\nHost example\n    User someone\n"
USER_KEY_LINE = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDeadBeefDeadBeefDeadBeefDeadBeefDeadBeefDeadB mine@laptop\n"


def cluster_outputs(lab, path, hostnames):
    """The lab's outputs naming only HOSTNAMES (the orchestrator first), as a stack after a replacement says."""
    document = lab.outputs
    by_address = {host["private_ip"]: host for host in [document["orchestrator"], *document["factories"]]}
    hosts = [by_address[address] for name, address in zip(lab.hostnames, lab.addresses) if name in hostnames]
    document["orchestrator"], document["factories"] = hosts[0], hosts[1:]
    path.write_text(json.dumps(document))
    return path


def deploy(lab, inputs, outputs, *extra):
    result = lab.deploy(*lab.lab_arguments(outputs), "--secrets", str(inputs["secrets"]),
                        "--resource", f"data={inputs['resource']}", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def address_of(lab, hostname):
    return dict(zip(lab.hostnames, lab.addresses))[hostname]


def with_the_old_key(lab, source, target):
    """ssh from SOURCE to TARGET with SOURCE's copy of the cluster key only, its pinned member keys, no prompt."""
    return lab.ssh(address_of(lab, source),
                   "ssh -F /dev/null -i ~/ray_bootstrap_key.pem -o IdentitiesOnly=yes -o IdentityAgent=none "
                   "-o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=~/.ssh/flambe_known_hosts "
                   f"-o ConnectTimeout=10 {address_of(lab, target)} hostname")


def as_an_intruder(lab, source, target):
    """ssh from SOURCE to TARGET with SOURCE's copy of the cluster key, accepting any host key: a host that left
    does not care whose host it reaches, only whether its key still opens it."""
    return lab.ssh(address_of(lab, source),
                   "ssh -F /dev/null -i ~/ray_bootstrap_key.pem -o IdentitiesOnly=yes -o IdentityAgent=none "
                   "-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                   f"-o ConnectTimeout=10 {address_of(lab, target)} hostname")


def add_user_lines(lab, hostname):
    """The user's own lines in ~/.ssh/config and ~/.ssh/authorized_keys; returns what they must stay."""
    ssh = lab.home(hostname) / ".ssh"
    config = ssh / "config"
    config.write_bytes(config.read_bytes() + USER_CONFIG)
    os.chown(config, lab.state["uid"], lab.state["uid"])
    authorized = ssh / "authorized_keys"
    authorized.write_bytes(USER_KEY_LINE + authorized.read_bytes())
    return {"config": config.read_bytes().split(b"# END flambe cluster", 1)[1].split(b"\n", 1)[1],
            "authorized": [line for line in authorized.read_bytes().splitlines(keepends=True)
                           if b"flambe-cluster:" not in line]}


@pytest.fixture
def replaced(make_lab, deploy_inputs, tmp_path):
    """A 4-host lab: a cluster of orchestrator, factory-1 and factory-2 deployed; outputs where factory-3 replaced
    factory-2 (which keeps running, holding its copy of the cluster key)."""
    lab = make_lab(4)
    before = cluster_outputs(lab, tmp_path / "before.json", ("orchestrator", "factory-1", "factory-2"))
    deploy(lab, deploy_inputs, before)
    assert as_an_intruder(lab, "factory-2", "orchestrator").stdout.strip() == "orchestrator"  # it holds the key
    user_lines = {name: add_user_lines(lab, name) for name in ("orchestrator", "factory-1")}
    after = cluster_outputs(lab, tmp_path / "after.json", ("orchestrator", "factory-1", "factory-3"))
    return lab, after, user_lines


def test_one_deploy_brings_the_new_member_in_and_the_member_that_left_is_refused_everywhere(replaced, deploy_inputs,
                                                                                            tmp_path):
    lab, after, user_lines = replaced
    departed_id = lab.outputs["factories"][1]["id"]
    report_path = tmp_path / "report.json"
    result = deploy(lab, deploy_inputs, after, "--report", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["cluster_key_action"] == "rotated"
    assert report["departed_members"] == [{"id": departed_id, "private_ip": address_of(lab, "factory-2"),
                                           "holds_cluster_key": False}]
    assert f"{departed_id} ({address_of(lab, 'factory-2')})" in result.stdout and "rotated" in result.stdout

    new = lab.home("factory-3")
    assert (new / "secret.ini").read_bytes() == CANARY_SECRETS
    assert (new / "resources" / "data" / "train.csv").read_text() == "a,b\n1,2\n"
    members = ("orchestrator", "factory-1", "factory-3")
    old_address, new_address = address_of(lab, "factory-2"), address_of(lab, "factory-3")
    for name in members:
        ssh = lab.home(name) / ".ssh"
        pinned = [line.split()[0] for line in (ssh / "flambe_known_hosts").read_text().splitlines()]
        assert sorted(set(pinned)) == sorted(address_of(lab, member) for member in members), name
        block = (ssh / "config").read_text().split("# END flambe cluster")[0]
        assert old_address not in block and new_address in block, name
        assert lab.manifest(name)["cluster_key_fingerprint"] == report["cluster_key_fingerprint"]
        for other in members:
            if other != name:
                assert with_the_old_key(lab, name, other).stdout.strip() == other  # the members reach each other
    for name, lines in user_lines.items():
        ssh = lab.home(name) / ".ssh"
        assert (ssh / "config").read_bytes().endswith(lines["config"])
        assert [line for line in (ssh / "authorized_keys").read_bytes().splitlines(keepends=True)
                if b"flambe-cluster:" not in line] == lines["authorized"]

    for name in members:  # the member that left, still running, with its old copy of the key: refused by every one
        refused = as_an_intruder(lab, "factory-2", name)
        assert refused.returncode == 255 and "Permission denied" in refused.stderr, (name, refused.stdout)


def test_with_the_keep_flag_the_key_stays_and_the_report_says_who_still_holds_it(replaced, deploy_inputs, tmp_path):
    lab, after, _ = replaced
    report_path = tmp_path / "report.json"
    result = deploy(lab, deploy_inputs, after, "--keep-cluster-key", "--report", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["cluster_key_action"] == "kept"
    assert [(member["private_ip"], member["holds_cluster_key"]) for member in report["departed_members"]] == [
        (address_of(lab, "factory-2"), True)]
    assert "STILL HOLD the cluster key" in result.stdout
    assert as_an_intruder(lab, "factory-2", "factory-3").stdout.strip() == "factory-3"  # the report tells the truth
