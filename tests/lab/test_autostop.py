"""The autostop agent on real hosts: what keeps a member up (a busy GPU, an SSH session), the order of stopping
(factories first, the orchestrator once they have), a spot notice that reaches the runnable's on_preempt, the
crontab kept byte for byte, an agent that returns after a kill and after a reboot, and `off` leaving nothing.

The lab records `sudo -n shutdown` in hosts/NAME/shutdowns instead of running it; a GPU is a stand-in nvidia-smi
(--fault INDEX:gpu=PERCENT, or what a test writes into hosts/NAME/gpu-reading) and the metadata service a stand-in
on 169.254.169.254 (--fault INDEX:spot-notice=S; hosts/NAME/metadata-mode makes it trickle, or withdraw its notice and
give a second one).
Every deploy passes --autostop-cpu 64: the lab's hosts share this machine's CPU, which other work keeps busy.
"""

import json
import shlex
import subprocess
import sys
import time

import pytest
from lab_session import LabSession, home_environment

pytestmark = pytest.mark.lab

WINDOW = "0.2"  # minutes: 12 s idle, sampled every 2 s
QUIET_CPU = ("--autostop-cpu", "64")
USERS_CRONTAB = b"# my own jobs\nMAILTO=\"\"\n*/5 * * * * echo '50%' > /dev/null  \n@daily  true\n"

RUNNABLE_SOURCE = '''
import json
import time

from flambe_iac import Runnable


class Train(Runnable):
    def run(self):
        time.sleep(600)

    def on_preempt(self, host_id, interruption):
        (self.resources["out"] / "checkpoint.json").write_text(json.dumps({"host": host_id, "notice": interruption}))
'''


def shutdowns(lab: LabSession, name: str) -> list[float]:
    """When the host's `sudo -n shutdown` ran, as the lab's sudo recorded it."""
    text = (lab.directory / "hosts" / name / "shutdowns").read_text()
    return [float(line.split()[0]) for line in text.splitlines() if line.strip()]


def agent_state(lab: LabSession, name: str) -> dict:
    path = lab.home(name) / ".flambe" / "autostop.state"
    return json.loads(path.read_text()) if path.exists() else {}


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def on_host(lab: LabSession, index: int, command: str) -> subprocess.CompletedProcess:
    return lab.ssh(lab.addresses[index], command)


def deploy(lab: LabSession, tmp_path, *arguments):
    return lab.deploy(*lab.lab_arguments(), *arguments, env=home_environment(tmp_path / "home"))


def runnable_file(tmp_path, source: str):
    """A runnable file for `trainext.train:Train` (SOURCE) with one resource, `out`."""
    extension = tmp_path / "trainext"
    (extension / "trainext").mkdir(parents=True)
    (extension / "trainext" / "__init__.py").write_text("")
    (extension / "trainext" / "train.py").write_text(source)
    out = tmp_path / "out"
    out.mkdir()
    runnable = tmp_path / "runnable.yaml"
    runnable.write_text(f"trainext: {extension}\n---\nrunnable: trainext.train:Train\nresources: {{out: {out}}}\n")
    return runnable


def agent_pids(lab: LabSession, name: str) -> list[int]:
    return [pid for pid in lab.sshd_pids(name)
            if b"flambe_iac.agent" in open(f"/proc/{pid}/cmdline", "rb").read()]


def test_a_busy_gpu_keeps_its_factory_up_the_idle_one_stops_and_the_orchestrator_stops_last(make_lab, tmp_path):
    lab = make_lab(3, "--fault", "1:gpu=80")
    assert on_host(lab, 1, f"printf %s {shlex.quote(USERS_CRONTAB.decode())} | crontab -").returncode == 0
    result = deploy(lab, tmp_path, "--autostop", WINDOW, *QUIET_CPU)
    assert result.returncode == 0, result.stdout + result.stderr

    wait_for(lambda: shutdowns(lab, "factory-2"), 60, "the idle factory's shutdown")
    assert shutdowns(lab, "factory-1") == [] and shutdowns(lab, "orchestrator") == []
    assert agent_state(lab, "factory-1")["last_busy"].startswith("gpu 80%")
    waiting = wait_for(lambda: agent_state(lab, "orchestrator").get("waiting_for"), 30, "the orchestrator waits")
    assert waiting[0].startswith(f"{lab.addresses[1]}: busy (gpu 80%")
    assert agent_state(lab, "orchestrator")["state"] == "waiting for factories"

    gpu = lab.directory / "hosts" / "factory-1" / "bin" / "nvidia-smi"
    gpu.write_text(gpu.read_text().replace("echo 80", "echo 3"))  # the job ends: the GPU idles
    wait_for(lambda: shutdowns(lab, "orchestrator"), 90, "the orchestrator's shutdown")
    assert shutdowns(lab, "factory-1")[0] <= shutdowns(lab, "orchestrator")[0]
    assert shutdowns(lab, "factory-2")[0] <= shutdowns(lab, "orchestrator")[0]

    table = on_host(lab, 1, "crontab -l").stdout.encode()
    assert table.startswith(USERS_CRONTAB) and table.count(b"# flambe-autostop") == 1
    status = lab.deploy("status", *lab.lab_arguments(), env=home_environment(tmp_path / "home"))
    assert "autostop: stopping" in status.stdout

    off = deploy(lab, tmp_path, "--autostop", "off")
    assert off.returncode == 0, off.stdout + off.stderr
    assert on_host(lab, 1, "crontab -l").stdout.encode() == USERS_CRONTAB  # the user's lines, byte for byte
    for index, name in enumerate(lab.hostnames):
        assert agent_pids(lab, name) == [], name
        listing = on_host(lab, index, "crontab -l 2>&1; ls -A .flambe").stdout
        assert "flambe-autostop" not in listing and "autostop" not in listing, listing
    assert "unchanged" in deploy(lab, tmp_path, "--autostop", "off").stdout


def test_an_open_ssh_session_keeps_a_factory_up_until_it_ends(make_lab, tmp_path):
    lab = make_lab(2)
    session = subprocess.Popen([sys.executable, "-m", "flambe_iac.cli.lab", "exec", "--dir", str(lab.directory), "--",
                                "ssh", "-F", "/dev/null", "-i", str(lab.user_key), "-o", "IdentitiesOnly=yes",
                                "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "BatchMode=yes",
                                f"{lab.user}@{lab.addresses[1]}", "sleep 30"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        result = deploy(lab, tmp_path, "--autostop", WINDOW, *QUIET_CPU)
        assert result.returncode == 0, result.stdout + result.stderr
        time.sleep(20)  # past the window
        assert shutdowns(lab, "factory-1") == []
        assert "1 ssh session" in agent_state(lab, "factory-1")["last_busy"]
    finally:
        session.wait(timeout=60)
    ended = time.time()
    wait_for(lambda: shutdowns(lab, "factory-1"), 40, "the factory's shutdown once the session ended")
    # a whole window (12 s) after the last sample that saw the session (at most 2 s before its end; whole seconds)
    assert shutdowns(lab, "factory-1")[0] >= ended + 12 - 2 - 1


def test_a_spot_notice_reaches_on_preempt_and_shows_in_status(make_lab, tmp_path):
    lab = make_lab(3, "--fault", "2:spot-notice=20")
    result = deploy(lab, tmp_path, str(runnable_file(tmp_path, RUNNABLE_SOURCE)), "--run", "--autostop", "30",
                    *QUIET_CPU)
    assert result.returncode == 0, result.stdout + result.stderr

    checkpoint = lab.home("orchestrator") / "resources" / "out" / "checkpoint.json"
    wait_for(checkpoint.exists, 60, "on_preempt's checkpoint on the orchestrator")
    factory_id = lab.outputs["factories"][1]["id"]
    saved = json.loads(checkpoint.read_text())
    assert saved["host"] == factory_id and saved["notice"].startswith("terminate at ")
    done = lab.home("orchestrator") / ".flambe" / "preempted" / f"{factory_id}.done"
    assert wait_for(done.exists, 10, "the notice's outcome") and done.read_text() == "on_preempt returned\n"
    record = agent_state(lab, "factory-2")
    assert record["state"] == "preempted" and record["preempted_at"] is not None
    assert shutdowns(lab, "factory-2") == []  # AWS takes the instance: the agent does not stop it itself

    report = tmp_path / "status.json"
    status = lab.deploy("status", *lab.lab_arguments(), "--report", str(report),
                        env=home_environment(tmp_path / "home"))
    assert "autostop: preempted at " in status.stdout
    hosts = json.loads(report.read_text())["hosts"]
    assert hosts[2]["agent_record"]["state"] == "preempted"


def test_a_killed_agent_returns_with_the_next_deploy_and_a_rebooted_host_gets_it_from_its_crontab(make_lab, tmp_path):
    lab = make_lab(2)
    assert deploy(lab, tmp_path, "--autostop", "30", *QUIET_CPU).returncode == 0
    (first,) = agent_pids(lab, "factory-1")
    subprocess.run(["kill", str(first)], check=True)
    wait_for(lambda: agent_pids(lab, "factory-1") == [], 10, "the agent's end")
    status = lab.deploy("status", *lab.lab_arguments(), env=home_environment(tmp_path / "home"))
    assert status.returncode == 1 and "the autostop agent is not running" in status.stdout
    without_autostop = deploy(lab, tmp_path)  # leaves the agents as they are, and says which member has none
    assert without_autostop.returncode == 0, without_autostop.stdout + without_autostop.stderr
    assert "autostop agents run on 1 of 2 members, but not on lab-" in without_autostop.stdout
    assert "-h1: a deploy without --autostop" in without_autostop.stdout and agent_pids(lab, "factory-1") == []

    again = deploy(lab, tmp_path, "--autostop", "30", *QUIET_CPU)
    assert again.returncode == 0 and "factory" in again.stdout
    assert len(agent_pids(lab, "factory-1")) == 1 and agent_pids(lab, "factory-1") != [first]
    unchanged = deploy(lab, tmp_path, "--autostop", "30", *QUIET_CPU)
    assert unchanged.stdout.count("unchanged") == 2, unchanged.stdout

    reboot = subprocess.run([sys.executable, "-m", "flambe_iac.cli.lab", "reboot", "--dir", str(lab.directory),
                             "--host", "1"], capture_output=True, text=True, timeout=60)
    assert reboot.returncode == 0, reboot.stderr
    wait_for(lambda: agent_pids(lab, "factory-1"), 20, "the agent back from cron's @reboot")
    assert agent_state(lab, "factory-1")["state"] == "watching"

    # An agent that died with its settings taken away (a refused install), and a notice left on the orchestrator:
    # `off` still removes every file of ours and the @reboot line that would start the agent again.
    for pid in agent_pids(lab, "factory-1"):
        subprocess.run(["kill", str(pid)], check=True)
    wait_for(lambda: agent_pids(lab, "factory-1") == [], 10, "the agent's end")
    assert on_host(lab, 1, "rm .flambe/autostop.json").returncode == 0
    assert on_host(lab, 0, "mkdir -p .flambe/preempted && echo {} > .flambe/preempted/i-9.json").returncode == 0
    off = deploy(lab, tmp_path, "--autostop", "off")
    assert off.returncode == 0, off.stdout + off.stderr
    for index, name in enumerate(lab.hostnames):
        listing = on_host(lab, index, "crontab -l 2>&1; ls -A .flambe").stdout
        assert "autostop" not in listing and "preempted" not in listing, (name, listing)


def test_a_host_that_may_not_sudo_shutdown_fails_the_step_with_that_cause(make_lab, tmp_path):
    lab = make_lab(2, "--fault", "1:no-sudo")
    report = tmp_path / "report.json"
    result = deploy(lab, tmp_path, "--autostop", "30", "--report", str(report))
    assert result.returncode == 1
    hosts = {host["address"]: host for host in json.loads(report.read_text())["hosts"]}
    failed = hosts[lab.addresses[1]]
    assert "may not run `sudo -n shutdown`" in failed["error"] and "--autostop off" in failed["error"]
    assert failed["steps"]["autostop"]["status"] == "failed"
    assert hosts[lab.addresses[0]]["steps"]["autostop"]["status"] == "changed"
    assert agent_pids(lab, "factory-1") == []


NOTICES_RUNNABLE_SOURCE = '''
import json
import time

from flambe_iac import Runnable


class Train(Runnable):
    def run(self):
        time.sleep(600)

    def on_preempt(self, host_id, interruption):
        with open(self.resources["out"] / "notices.jsonl", "a") as notices:
            notices.write(json.dumps({"host": host_id, "notice": interruption}) + "\\n")
'''


def test_a_trickling_metadata_service_a_notice_served_again_and_an_unreadable_gpu_across_rounds(make_lab, tmp_path):
    """factory-1's metadata service trickles its answer: the factory still stops. factory-2 (busy) gets a notice
    served at every question, withdrawn (as after a hibernation), then a second one: on_preempt runs once for each.
    factory-3's nvidia-smi answers MIG's [N/A]: it never stops."""
    lab = make_lab(4, "--fault", "1:spot-notice=3600", "--fault", "2:spot-notice=45", "--fault", "2:gpu=80",
                   "--fault", "3:gpu=0")
    hosts = lab.directory / "hosts"
    (hosts / "factory-1" / "metadata-mode").write_text("trickle\n")
    (hosts / "factory-2" / "metadata-mode").write_text("again\n")
    (hosts / "factory-3" / "gpu-reading").write_text("[N/A]\n")
    runnable = runnable_file(tmp_path, NOTICES_RUNNABLE_SOURCE)
    result = deploy(lab, tmp_path, str(runnable), "--run", "--autostop", WINDOW, *QUIET_CPU)
    assert result.returncode == 0, result.stdout + result.stderr

    wait_for(lambda: shutdowns(lab, "factory-1"), 40, "factory-1's shutdown, its metadata service trickling")
    assert agent_state(lab, "factory-1")["state"] == "stopping"
    time.sleep(4)  # two more samples
    assert shutdowns(lab, "factory-3") == [] and agent_state(lab, "factory-3")["last_busy"].startswith(
        "gpu unreadable")

    notices = lab.home("orchestrator") / "resources" / "out" / "notices.jsonl"
    wait_for(lambda: notices.exists() and len(notices.read_text().splitlines()) >= 2, 120, "two on_preempt calls")
    time.sleep(6)  # the second notice asked again at every round since
    calls = [json.loads(line) for line in notices.read_text().splitlines()]
    factory_id = lab.outputs["factories"][1]["id"]
    assert [call["host"] for call in calls] == [factory_id, factory_id]
    assert calls[0]["notice"] != calls[1]["notice"] and all(call["notice"].startswith("terminate at 20")
                                                            for call in calls)
    assert agent_state(lab, "factory-2")["state"] == "preempted" and shutdowns(lab, "factory-2") == []
    assert shutdowns(lab, "factory-3") == []
