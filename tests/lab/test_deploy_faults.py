"""Faults and bad input: one host down does not stop the others; bad input sends nothing to any host."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from lab_session import home_environment

pytestmark = pytest.mark.lab


def test_one_host_down_the_others_finish_and_a_rerun_converges(fresh_lab, deploy_inputs, tmp_path):
    down_pid = fresh_lab.sshd_pid("factory-2")
    os.kill(down_pid, signal.SIGSTOP)  # accepts TCP, never answers: the worst kind of down
    report_path = tmp_path / "report.json"
    try:
        result = fresh_lab.deploy(*fresh_lab.lab_arguments(), "--secrets", str(deploy_inputs["secrets"]),
                                  "--connect-timeout", "2", "--wait", "0", "--report", str(report_path))
    finally:
        os.kill(down_pid, signal.SIGCONT)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    down = next(host for host in report["hosts"] if host["address"] == fresh_lab.addresses[2])
    assert down["error"]
    assert "factory" in down["role"] and fresh_lab.addresses[2] in result.stdout
    # Asked and not done: failed with the host's cause, never "skipped" (that means "not asked").
    assert {name for name, step in down["steps"].items() if step["status"] == "failed"} == \
        {"cluster key", "secrets", "manifest"}
    assert {step["status"] for step in down["steps"].values()} == {"failed", "skipped"}
    for name in ("orchestrator", "factory-1"):
        assert (fresh_lab.home(name) / "secret.ini").exists()
    assert not (fresh_lab.home("factory-2") / "secret.ini").exists()

    again = fresh_lab.deploy(*fresh_lab.lab_arguments(), "--secrets", str(deploy_inputs["secrets"]),
                             "--report", str(report_path))
    assert again.returncode == 0, again.stdout + again.stderr
    report = json.loads(report_path.read_text())
    assert report["cluster_key_action"] == "kept"
    statuses = {host["address"]: {step["status"] for step in host["steps"].values()} for host in report["hosts"]}
    assert statuses[fresh_lab.addresses[0]] == {"unchanged", "skipped"}  # no resources were asked for
    assert "changed" in statuses[fresh_lab.addresses[2]]
    result = fresh_lab.ssh(fresh_lab.addresses[2], f"ssh -o BatchMode=yes {fresh_lab.addresses[0]} hostname")
    assert result.stdout.strip() == "orchestrator", result.stderr


def passphrase_key(tmp_path: Path) -> Path:
    path = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "correct horse", "-f", str(path)], check=True)
    return path


BAD_INPUTS = {
    "missing key": (lambda lab, t: ["--key", str(t / "nope")], "cannot read SSH key"),
    "unreadable key": (lambda lab, t: ["--key", str(t)], "cannot read SSH key"),
    "public key given": (lambda lab, t: ["--key", str(lab.user_key) + ".pub"], "not an SSH private key"),
    "locked key": (lambda lab, t: ["--key", str(passphrase_key(t))], "FLAMBE_KEY_PASSPHRASE"),
    "malformed secrets": (lambda lab, t: ["--secrets", str(write(t / "s.ini", "[a]\nkey = CANARYVALUE\nno equals\n"))],
                          "line 3"),
    "secrets without section": (lambda lab, t: ["--secrets", str(write(t / "s.ini", "password = CANARYVALUE\n"))],
                                "line 1"),
    "masked outputs": (lambda lab, t: ["--outputs", str(masked_outputs(lab, t))], "--show-secrets"),
    "missing resource": (lambda lab, t: ["--resource", f"data={t / 'absent'}"], "no such file"),
    "duplicate resources": (lambda lab, t: ["--resource", f"data={t}", "--resource", f"data={t}"], "given twice"),
    "slash in resource name": (lambda lab, t: ["--resource", f"a/b={t}"], "not allowed"),
    "dotdot resource name": (lambda lab, t: ["--resource", f"..={t}"], "not allowed"),
    "bad cluster file": (lambda lab, t: ["--cluster", str(write(t / "c.yaml", "name: x\norchestrator_ip: not-an-ip\n"
                                                                             "username: ubuntu\n"))], "not an IP"),
}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def masked_outputs(lab, directory: Path) -> Path:
    document = lab.outputs
    document["orchestrator"]["public_ip"] = "[secret]"
    return write(directory / "masked.json", json.dumps(document))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_message_exit_2_and_nothing_is_sent(lab, tmp_path, case):
    make_arguments, expected = BAD_INPUTS[case]
    changes = make_arguments(lab, tmp_path)
    replaced = {"--key", "--outputs"} & set(changes[::2])
    if "--cluster" in changes:
        replaced.add("--outputs")  # a cluster file instead of the lab's outputs
    base = lab.lab_arguments()
    kept = [item for option, value in zip(base[::2], base[1::2]) if option not in replaced for item in (option, value)]
    before = lab.snapshot_hosts()
    env = {key: value for key, value in os.environ.items() if key != "FLAMBE_KEY_PASSPHRASE"}
    result = lab.deploy(*kept, *changes, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("flambe-deploy: ")
    assert "CANARYVALUE" not in result.stderr + result.stdout
    assert lab.snapshot_hosts() == before


def test_a_locked_key_with_its_passphrase_deploys(fresh_lab, tmp_path, deploy_inputs):
    locked = passphrase_key(tmp_path)
    public = Path(str(locked) + ".pub").read_text()
    for name in fresh_lab.hostnames:
        with open(fresh_lab.home(name) / ".ssh" / "authorized_keys", "a") as authorized:
            authorized.write(public)
    env = home_environment(tmp_path, FLAMBE_KEY_PASSPHRASE="correct horse")
    result = fresh_lab.deploy("--outputs", str(fresh_lab.directory / "outputs.json"), "--key", str(locked),
                              "--known-hosts", str(fresh_lab.known_hosts),
                              "--resource", f"data={deploy_inputs['resource']}", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (fresh_lab.home("factory-1") / "resources" / "data" / "train.csv").exists()
    assert "correct horse" not in result.stdout + result.stderr
    wrong = fresh_lab.deploy("--outputs", str(fresh_lab.directory / "outputs.json"), "--key", str(locked),
                             "--known-hosts", str(fresh_lab.known_hosts),
                             env={**env, "FLAMBE_KEY_PASSPHRASE": "wrong"})
    assert wrong.returncode == 2
    assert "does not unlock" in wrong.stderr
