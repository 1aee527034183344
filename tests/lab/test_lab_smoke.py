"""The lab gives real, isolated OpenSSH hosts, and leaves nothing behind."""

import json
import subprocess
import time

import pytest
from lab_session import LabSession, flambe_lab, lab_leftovers, machine_snapshot, require_lab_support

from flambe_iac.errors import LabError
from flambe_iac.inputs.outputs import load_outputs
from flambe_iac.lab import build, hosts, teardown

pytestmark = pytest.mark.lab


def test_ssh_reaches_every_host_with_only_the_user_key_and_strict_host_keys(lab):
    for address, hostname in zip(lab.addresses, lab.hostnames):
        result = lab.ssh(address, "hostname")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == hostname


def test_hostnames_are_distinct(lab):
    names = [lab.ssh(address, "hostname").stdout.strip() for address in lab.addresses]
    assert len(set(names)) == len(names) == 3


def test_homes_are_isolated(lab):
    first, second = lab.addresses[:2]
    assert lab.ssh(first, "echo only-here > ~/isolation-probe").returncode == 0
    assert (lab.home(lab.hostnames[0]) / "isolation-probe").read_text() == "only-here\n"
    assert not (lab.home(lab.hostnames[1]) / "isolation-probe").exists()
    assert lab.ssh(second, "test ! -e ~/isolation-probe").returncode == 0


def test_tmp_is_private_to_each_host(lab):
    first, second = lab.addresses[:2]
    assert lab.ssh(first, "touch /tmp/tmp-probe").returncode == 0
    assert lab.ssh(second, "test ! -e /tmp/tmp-probe").returncode == 0


def test_each_host_sees_and_stops_only_its_own_processes(lab):
    first, second = lab.addresses[:2]
    assert lab.ssh(first, "ps -o comm= -p 1").stdout.strip() == "sshd"  # sshd is the host's PID 1
    started = lab.ssh(second, "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo started")
    assert started.stdout.strip() == "started"
    try:
        assert "sleep" not in lab.ssh(first, "ps -e -o comm=").stdout.split()
        assert lab.ssh(first, "pkill -x sleep").returncode == 1  # nothing of that name on this host
        assert "sleep" in lab.ssh(second, "ps -e -o comm=").stdout.split()
    finally:
        lab.ssh(second, "pkill -x sleep")


def test_the_login_user_exists_only_inside_the_hosts(lab):
    assert lab.ssh(lab.addresses[0], "id -un").stdout.strip() == lab.user
    assert f"\n{lab.user}:" not in "\n" + open("/etc/passwd").read()


def test_a_wrong_key_is_refused(lab, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    result = lab.ssh(lab.addresses[0], "true", key=stranger)
    assert result.returncode == 255
    assert "Permission denied" in result.stderr


def test_a_host_key_not_in_known_hosts_is_refused(lab, tmp_path):
    wrong = tmp_path / "known_hosts"
    other_key = (lab.directory / "hosts" / lab.hostnames[1] / "etc" / "ssh_host_ed25519_key.pub").read_text()
    wrong.write_text(f"{lab.addresses[0]} {' '.join(other_key.split()[:2])}\n")
    result = lab.run_in_client(
        "ssh", "-F", "/dev/null", "-i", str(lab.user_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={wrong}", f"{lab.user}@{lab.addresses[0]}",
        "true")
    assert result.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in result.stderr


def test_password_and_root_logins_are_off(lab):
    config = (lab.directory / "hosts" / lab.hostnames[0] / "etc" / "sshd_config").read_text()
    assert "PasswordAuthentication no" in config
    assert "PermitRootLogin no" in config
    result = lab.run_in_client(
        "ssh", "-F", "/dev/null", "-i", str(lab.user_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={lab.known_hosts}",
        f"root@{lab.addresses[0]}", "true")
    assert result.returncode == 255


def test_writes_contract_v1_outputs_with_the_host_addresses(lab):
    cluster = load_outputs(lab.directory / "outputs.json")
    assert cluster.ssh_user == lab.user
    assert [host.private_ip for host in cluster.members] == lab.addresses
    assert [host.public_ip for host in cluster.members] == lab.addresses
    assert cluster.orchestrator.role == "orchestrator"
    assert len(cluster.factories) == 2


def test_a_second_up_in_the_same_directory_is_refused(lab):
    result = flambe_lab("up", "--hosts", "1", "--dir", str(lab.directory), check=False)
    assert result.returncode == 2
    assert "already up" in result.stderr


def test_up_and_down_change_nothing_on_the_machine_and_leave_nothing(tmp_path):
    require_lab_support()
    before = machine_snapshot()
    session = LabSession.up(tmp_path / "lab", 4, "--addresses", "10.0.1.20,10.0.1.21,10.0.1.22,10.0.1.23",
                            "--subnet", "10.0.0.0/16")
    lab_id = session.state["lab_id"]
    try:
        assert machine_snapshot() == before
        assert session.ssh("10.0.1.23", "hostname").stdout.strip() == "factory-3"
        pids = {pid for name in session.hostnames for pid in session.sshd_pids(name)}
        assert len(lab_leftovers(lab_id, pids)) > 0  # the check below can see a live lab
    finally:
        down = session.down()
    assert "removed 6 namespaces" in down.stdout
    assert machine_snapshot() == before
    assert lab_leftovers(lab_id, pids) == []
    again = session.down()
    assert again.returncode == 0
    assert lab_leftovers(lab_id, pids) == []


def test_host_links_are_limited_both_ways_inside_the_lab_only(tmp_path):
    """--host-mbit: a tbf on each host's eth0 (what it sends) and on the switch's port to it (what it receives); the
    client's link and the machine's root namespace stay as they were."""
    require_lab_support()
    before = machine_snapshot()
    session = LabSession.up(tmp_path / "lab", 2, "--host-mbit", "50")
    try:
        lab_id = session.state["lab_id"]
        for host in session.state["hosts"]:
            index = host["netns"].rsplit("-h", 1)[1]
            for netns, device in ((host["netns"], "eth0"), (f"flambe-{lab_id}-sw", f"h{index}")):
                shown = subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", device], capture_output=True,
                                       text=True, check=True).stdout
                assert "tbf" in shown and "rate 50Mbit" in shown, (netns, device, shown)
        client = subprocess.run(["tc", "-n", f"flambe-{lab_id}-client", "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True, check=True).stdout
        assert "tbf" not in client
        assert machine_snapshot() == before
    finally:
        session.down()


def test_down_cleans_up_after_up_crashed_halfway(tmp_path, monkeypatch):
    """An `up` killed after starting two sshds, before it could clean up: `down` still removes it all."""
    require_lab_support()
    started = []
    real_start_sshd = build.start_sshd

    def start_two_then_crash(lab_dir, host):
        if len(started) == 2:
            raise KeyboardInterrupt("simulated crash")
        started.append(real_start_sshd(lab_dir, host))
        return started[-1]

    monkeypatch.setattr(build, "start_sshd", start_two_then_crash)
    monkeypatch.setattr(build, "down", lambda lab_dir: None)  # the crashed process never cleans up
    with pytest.raises(KeyboardInterrupt):
        build.up(tmp_path, 4)
    monkeypatch.undo()
    lab_id = json.loads((tmp_path / "lab.json").read_text())["lab_id"]
    deadline = time.monotonic() + 10
    while not all(teardown.pid_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lab_leftovers(lab_id)) >= 6

    result = flambe_lab("down", "--dir", str(tmp_path))
    assert "removed 6 namespaces" in result.stdout
    assert lab_leftovers(lab_id) == []


def test_a_failing_up_removes_what_it_made(tmp_path, monkeypatch):
    require_lab_support()
    monkeypatch.setattr(hosts, "boot_script", lambda directory, host, metadata=False: "exit 3\n")
    with pytest.raises(LabError, match="sshd on orchestrator exited"):
        build.up(tmp_path, 2)
    lab_id = json.loads((tmp_path / "lab.json").read_text())["lab_id"]
    assert lab_leftovers(lab_id) == []
