"""Hosts unlike the lab's defaults, made with `flambe-lab up --fault`: every fault ends in an honest per-host result,
the other hosts complete, and a re-run converges. Faults break the host, never our code."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab


def faulty_lab(make_lab, hosts, *faults):
    return make_lab(hosts, *(item for fault in faults for item in ("--fault", fault)))


def staging_left(lab, name):
    """What runs left in a host's staging area (which an interrupt before the first upload never made)."""
    staging = lab.home(name) / ".flambe" / "staging"
    return sorted(path.name for path in staging.iterdir()) if staging.exists() else []


def deploy_with_report(lab, tmp_path, *arguments, **options):
    report = tmp_path / "report.json"
    result = lab.deploy(*lab.lab_arguments(), "--report", str(report), *arguments, **options)
    return result, json.loads(report.read_text())


def entries_by_address(report):
    return {entry["address"]: entry for entry in report["hosts"]}


def assert_holds_everything(lab, name, inputs):
    home = lab.home(name)
    assert (home / "secret.ini").read_bytes() == inputs["secrets"].read_bytes()
    assert oct((home / "secret.ini").stat().st_mode & 0o777) == "0o600"
    for path in inputs["resource"].rglob("*"):
        if path.is_file():
            copy = home / "resources" / "data" / path.relative_to(inputs["resource"])
            assert copy.read_bytes() == path.read_bytes(), copy
    assert lab.manifest(name)["cluster_key_fingerprint"]


def assert_honest(result, report):
    """ok agrees with the exit code, and no asked step of a connected host reads as skipped or pending."""
    assert report["ok"] is (result.returncode == 0)
    for entry in report["hosts"]:
        assert "pending" not in {step["status"] for step in entry["steps"].values()}
        assert (entry["error"] is None) == all(step["status"] != "failed" for step in entry["steps"].values())


def test_a_host_without_sftp_gets_everything(make_lab, tmp_path, deploy_inputs):
    lab = faulty_lab(make_lab, 3, "1:no-sftp")
    assert "Subsystem" not in (lab.directory / "hosts" / "factory-1" / "etc" / "sshd_config").read_text()
    result, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]),
                                        "--resource", f"data={deploy_inputs['resource']}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_honest(result, report)
    for name in lab.hostnames:
        assert_holds_everything(lab, name, deploy_inputs)
    assert "subsystem request for sftp" not in lab.sshd_log("factory-1")
    hop = lab.ssh(lab.addresses[1], f"ssh -o BatchMode=yes {lab.addresses[0]} hostname")
    assert hop.stdout.strip() == "orchestrator", hop.stderr


def test_sshd_killed_after_the_state_read_fails_that_host_only(make_lab, tmp_path, deploy_inputs):
    """The host's sshd and its sessions are killed the moment the state read makes this run's staging directory:
    the deploy exits 1 naming that host, the others complete, and the report is written."""
    lab = make_lab(3)
    staging = lab.home("factory-2") / ".flambe" / "staging"
    killed = threading.Event()

    def kill_when_the_state_is_read():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if staging.is_dir() and any(staging.iterdir()):
                for pid in lab.sshd_pids("factory-2"):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue  # a session that ended on its own meanwhile
                killed.set()
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=kill_when_the_state_is_read)
    watcher.start()
    result, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]),
                                        "--resource", f"data={deploy_inputs['resource']}", "--wait", "0",
                                        "--connect-timeout", "3")
    watcher.join()
    assert killed.is_set()
    assert result.returncode == 1, result.stdout + result.stderr
    assert_honest(result, report)
    entries = entries_by_address(report)
    dead = entries[lab.addresses[2]]
    assert dead["error"] and dead["steps"]["secrets"]["status"] == "failed"
    assert "Traceback" not in result.stderr
    for name in ("orchestrator", "factory-1"):
        assert_holds_everything(lab, name, deploy_inputs)


def test_hosts_that_connect_early_keep_their_connection_while_a_late_one_boots(make_lab, tmp_path, deploy_inputs):
    """A factory's sshd starts 40 s late (an instance still booting after `pulumi up`): the members that connected
    at once keep their one connection through the wait (a master with no session would close itself after 30 s
    idle), and every host gets everything."""
    lab = faulty_lab(make_lab, 3, "2:late-sshd=40")
    result, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]),
                                        "--resource", f"data={deploy_inputs['resource']}", "--wait", "90",
                                        timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["ok"] is True and "waiting for sshd" in result.stderr
    for name in lab.hostnames:
        assert_holds_everything(lab, name, deploy_inputs)


def test_five_hostile_hosts_with_wait(make_lab, tmp_path, deploy_inputs):
    """Host 2 has no SFTP, host 3's home is a 256 KiB tmpfs, host 4's sshd starts 10 s late."""
    lab = faulty_lab(make_lab, 5, "1:no-sftp", "2:small-home=256k", "3:late-sshd=10")
    (deploy_inputs["resource"] / "big.bin").write_bytes(os.urandom(1 << 20))
    result, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]),
                                        "--resource", f"data={deploy_inputs['resource']}", "--wait", "60",
                                        timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert_honest(result, report)
    for name in ("orchestrator", "factory-1", "factory-3", "factory-4"):
        assert_holds_everything(lab, name, deploy_inputs)
    full = entries_by_address(report)[lab.addresses[2]]
    assert "No space left on device" in full["error"], full
    home = lab.home("factory-2")
    user_key = lab.user_key.with_suffix(".pub").read_text().strip()
    assert user_key in (home / ".ssh" / "authorized_keys").read_text()
    secrets = home / "secret.ini"
    assert not secrets.exists() or secrets.read_bytes() == deploy_inputs["secrets"].read_bytes()
    assert "waiting for sshd" in result.stderr

    (deploy_inputs["resource"] / "big.bin").unlink()  # the fault fixed: the data now fits
    again, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]),
                                       "--resource", f"data={deploy_inputs['resource']}")
    assert again.returncode == 0, again.stdout + again.stderr
    for name in lab.hostnames:
        assert_holds_everything(lab, name, deploy_inputs)


def test_no_rsync_on_a_host_says_install_rsync(make_lab, tmp_path, deploy_inputs):
    lab = faulty_lab(make_lab, 3, "2:no-rsync")
    result, report = deploy_with_report(lab, tmp_path, "--resource", f"data={deploy_inputs['resource']}")
    assert result.returncode == 1
    assert_honest(result, report)
    assert "install rsync" in entries_by_address(report)[lab.addresses[2]]["error"]
    assert_holds_everything_but_secrets = [name for name in ("orchestrator", "factory-1")
                                           if (lab.home(name) / "resources" / "data" / "train.csv").exists()]
    assert assert_holds_everything_but_secrets == ["orchestrator", "factory-1"]


def test_max_sessions_one_on_a_factory_is_named_and_the_others_deploy(make_lab, tmp_path, deploy_inputs):
    """Every member holds the deploy lock on one session while the deploy works on another: a factory whose sshd
    allows one session fails with that cause; the orchestrator still gets everything."""
    lab = faulty_lab(make_lab, 2, "1:max-sessions=1")
    result, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]),
                                        "--resource", f"data={deploy_inputs['resource']}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert_honest(result, report)
    assert "MaxSessions" in entries_by_address(report)[lab.addresses[1]]["error"]
    assert_holds_everything(lab, "orchestrator", deploy_inputs)


def test_max_sessions_one_on_the_orchestrator_is_named_without_verbose(make_lab, tmp_path, deploy_inputs):
    lab = faulty_lab(make_lab, 2, "0:max-sessions=1")
    result, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]))
    assert result.returncode == 1
    assert_honest(result, report)
    assert "MaxSessions" in entries_by_address(report)[lab.addresses[0]]["error"]


def test_two_deploys_at_once_leave_one_cluster_key(make_lab, tmp_path, deploy_inputs):
    lab = make_lab(4)
    command = [sys.executable, "-m", "flambe_iac.cli.lab", "exec", "--dir", str(lab.directory), "--",
               sys.executable, "-m", "flambe_iac.cli.deploy", *lab.lab_arguments(),
               "--secrets", str(deploy_inputs["secrets"])]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    codes = [run.returncode for run in runs]
    assert 0 in codes, outputs
    keys = {(lab.home(name) / "ray_bootstrap_key.pub").read_text().split()[1] for name in lab.hostnames}
    assert len(keys) == 1
    for address, name in zip(lab.addresses[1:], lab.hostnames[1:]):
        hop = lab.ssh(lab.addresses[0], f"ssh -o BatchMode=yes {address} hostname")
        assert hop.stdout.strip() == name, hop.stderr
    assert staging_left(lab, "orchestrator") == []  # both cleaned up


def test_a_second_deploy_without_wait_names_the_one_under_way(make_lab, tmp_path, deploy_inputs):
    lab = make_lab(2)
    holder = subprocess.Popen(  # a deploy that holds the lock for a while: a slow, large resource
        [sys.executable, "-m", "flambe_iac.cli.lab", "exec", "--dir", str(lab.directory), "--", "sh", "-c",
         f"exec {sys.executable} -m flambe_iac.cli.deploy {' '.join(lab.lab_arguments())} "
         f"--resource data={big_resource(tmp_path, 40)}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    throttle(lab, "40mbit")
    lock_owner = lab.home("orchestrator") / ".flambe" / "deploy.lock.owner"
    deadline = time.monotonic() + 30
    while not lock_owner.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = lab.deploy(*lab.lab_arguments(), "--wait", "0")
    holder.communicate(timeout=120)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another deploy of" in second.stdout and "since" in second.stdout


def big_resource(tmp_path: Path, megabytes: int) -> Path:
    directory = tmp_path / "big"
    directory.mkdir(exist_ok=True)
    for index in range(3):
        (directory / f"part{index}.bin").write_bytes(os.urandom(megabytes * (1 << 20) // 3))
    return directory


def throttle(lab, rate: str) -> None:
    """Slow the client's own link (inside the lab's client namespace; tbf, as this kernel has no netem)."""
    lab.run_in_client("tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "64kb",
                      "latency", "400ms")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_mid_transfer_exits_130_or_143_and_the_next_run_converges(make_lab, tmp_path, signum, code):
    lab = make_lab(2)
    resource = big_resource(tmp_path, 150)
    throttle(lab, "100mbit")
    report = tmp_path / "report.json"
    deploy = subprocess.Popen(
        [sys.executable, "-m", "flambe_iac.cli.lab", "exec", "--dir", str(lab.directory), "--", sys.executable, "-m",
         "flambe_iac.cli.deploy", *lab.lab_arguments(), "--resource", f"data={resource}", "--report", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    time.sleep(1.0)
    deploy.send_signal(signum)
    stdout, stderr = deploy.communicate(timeout=60)
    assert deploy.returncode == code, stdout + stderr
    document = json.loads(report.read_text())
    assert document["interrupted"] == signal.Signals(signum).name and document["ok"] is False
    assert "Traceback" not in stderr
    time.sleep(0.5)
    assert not rsync_children(resource), "rsync went on after the interrupt"
    for name in lab.hostnames:
        target = lab.home(name) / "resources" / "data"
        for path in target.glob("part*.bin") if target.exists() else []:
            # A first copy that members take grows in place (engine/fan_out.py): cut short, it holds the file's
            # first bytes, never others, and its host is failed; the next run finishes it.
            assert (resource / path.name).read_bytes().startswith(path.read_bytes()), f"{path} holds other bytes"
        assert staging_left(lab, name) == []

    again = lab.deploy(*lab.lab_arguments(), "--resource", f"data={resource}", timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    for name in lab.hostnames:
        for path in resource.iterdir():
            copy = lab.home(name) / "resources" / "data" / path.name
            assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()


def rsync_children(resource: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if command.startswith("rsync") and str(resource) in command:
                found.append(command)
    return found


def test_an_unwritable_ssh_directory_fails_that_host_and_keeps_the_users_keys(make_lab, tmp_path, deploy_inputs):
    lab = make_lab(3)
    ssh_dir = lab.home("factory-2") / ".ssh"
    before = (ssh_dir / "authorized_keys").read_bytes()
    ssh_dir.chmod(0o555)  # the user's own directory, made read-only
    try:
        result, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]))
    finally:
        ssh_dir.chmod(0o700)
    assert result.returncode == 1
    assert_honest(result, report)
    failed = entries_by_address(report)[lab.addresses[2]]
    assert ".ssh" in failed["error"] and "Permission denied" in failed["error"], failed["error"]
    assert (ssh_dir / "authorized_keys").read_bytes() == before
    for name in ("orchestrator", "factory-1"):
        assert lab.manifest(name)["cluster_key_fingerprint"]
    again, _ = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]))
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_replaced_host_key_is_refused_and_that_host_receives_nothing(make_lab, tmp_path, deploy_inputs):
    lab = faulty_lab(make_lab, 3, "1:replaced-host-key")
    before = sorted(path.name for path in lab.home("factory-1").rglob("*"))
    result, report = deploy_with_report(lab, tmp_path, "--secrets", str(deploy_inputs["secrets"]), "--wait", "60")
    assert result.returncode == 1
    refused = entries_by_address(report)[lab.addresses[1]]
    assert refused["error"].startswith("REFUSED") and "ssh-keygen -R" in refused["error"]
    assert refused["connect_seconds"] < 30  # a wrong key is not waited for
    assert sorted(path.name for path in lab.home("factory-1").rglob("*")) == before


def deploy_in_background(lab, *arguments) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flambe_iac.cli.lab", "exec", "--dir", str(lab.directory), "--", sys.executable, "-m",
         "flambe_iac.cli.deploy", *lab.lab_arguments(), *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def test_an_interrupt_while_an_upload_is_held_open_removes_the_staging_everywhere(make_lab, tmp_path, deploy_inputs):
    """factory-1's shell holds every upload open for 8 s right after making its staging directory (a busy disk, a
    slow host). An interrupt then: the staging is gone from every host when flambe-deploy exits, and when the held
    command wakes it finds nothing to install: the secrets never land there from the interrupted run."""
    lab = make_lab(2)
    (lab.home("factory-1") / ".bashrc").write_text(
        'mkdir() { command mkdir "$@"; case "$*" in *staging*) sleep 8;; esac; }\n')
    staging = lab.home("factory-1") / ".flambe" / "staging"
    deploy = deploy_in_background(lab, "--secrets", str(deploy_inputs["secrets"]))
    deadline = time.monotonic() + 60
    while not (staging.is_dir() and any(staging.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert staging.is_dir() and any(staging.iterdir()), "the upload never started"
    deploy.send_signal(signal.SIGINT)
    stdout, stderr = deploy.communicate(timeout=60)
    assert deploy.returncode == 130, stdout + stderr
    for name in lab.hostnames:
        assert staging_left(lab, name) == [], name
    time.sleep(9)  # the held command wakes
    assert staging_left(lab, "factory-1") == []
    assert not (lab.home("factory-1") / "secret.ini").exists()


def test_a_deploy_held_past_the_takeover_time_keeps_its_lock(make_lab, tmp_path):
    """The lock frees itself 30 s after its holder's heartbeat stops. A deploy whose setup takes 40 s keeps it: a
    second deploy with --wait 0, 35 s in, is refused, naming the first; the first ends as if nothing happened."""
    lab = make_lab(2)
    first = deploy_in_background(lab, "--setup", "sleep 40")
    time.sleep(35)
    second = lab.deploy(*lab.lab_arguments(), "--wait", "0")
    stdout, stderr = first.communicate(timeout=120)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another deploy of" in second.stdout + second.stderr
    assert first.returncode == 0, stdout + stderr
