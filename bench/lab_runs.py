"""What the benchmarks share: running a command measured, putting the lab's hosts back, and the commands they time
(flambe-deploy in the lab's client namespace, and the plain parallel rsync a user without it would run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flambe_iac.agent.signals import machine_cpu
from flambe_iac.lab import model
from flambe_iac.ssh.policy import SshTarget, rsync_command


# Every measured command runs here: `python -m` puts its working directory first on sys.path, so run from a checkout
# it would load that checkout's flambe_iac whatever PYTHONPATH says, and a --baseline would measure today's code.
OUTSIDE_ANY_CHECKOUT = "/"


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far: the lab's sshds run on the same cores."""
    times = machine_cpu()
    return times.busy, times.total


def run_measured(argv: list[str], environment: dict | None = None) -> tuple[float, int, float, float]:
    """Wall seconds, peak resident memory (KiB) and CPU seconds of one command with its children (the client
    side: flambe-deploy, rsync, ssh), and how busy the whole machine was meanwhile."""
    busy_before, total_before = machine_cpu_ticks()
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment,
                               cwd=OUTSIDE_ANY_CHECKOUT)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(argv)}\n{process.stderr.read().decode()}")
    busy_after, total_after = machine_cpu_ticks()
    busy = (busy_after - busy_before) / max(total_after - total_before, 1)
    return elapsed, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, busy


def reset_hosts(lab_dir: Path, state: model.LabState) -> None:
    """Put every home back as `flambe-lab up` left it, so the next deploy is a first run."""
    user_key = (lab_dir / model.USER_KEY_FILE).with_suffix(".pub").read_text()
    for host in state.hosts:
        home = model.host_dir(lab_dir, host) / "home" / state.user
        for entry in home.iterdir():
            if entry.name != ".ssh":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in (home / ".ssh").iterdir():
            if entry.name != "authorized_keys":
                entry.unlink()
        (home / ".ssh" / "authorized_keys").write_text(user_key)


def timed(argv: list[str], environment: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment,
                            cwd=OUTSIDE_ANY_CHECKOUT)
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(argv)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def clear_resources(lab_dir: Path, state: model.LabState) -> None:
    for host in state.hosts:
        shutil.rmtree(model.host_dir(lab_dir, host) / "home" / state.user / "resources", ignore_errors=True)


def in_client(state: model.LabState, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", state.client_netns, *argv]


def plain_parallel_rsync(lab_dir: Path, state: model.LabState, addresses: list[str], resource: Path) -> list[str]:
    """What a user without flambe-deploy would run: one rsync per host, all at once."""
    rsyncs = []
    for address in addresses:
        target = SshTarget(address, state.user, lab_dir / model.USER_KEY_FILE, lab_dir / model.KNOWN_HOSTS_FILE)
        rsyncs.append(" ".join(subprocess.list2cmdline([part]) for part in
                               rsync_command(f"{resource}/", "resources/data/", target)))
    return in_client(state, "sh", "-c", " & ".join(rsyncs) + " & wait")


def deploy_command(lab_dir: Path, state: model.LabState, work: Path, hosts: int, *arguments: str) -> list[str]:
    """flambe-deploy from the client namespace, to the first HOSTS hosts of the lab."""
    outputs = json.loads((lab_dir / model.OUTPUTS_FILE).read_text())
    trimmed = work / f"outputs-{hosts}.json"
    trimmed.write_text(json.dumps({**outputs, "factories": outputs["factories"][: hosts - 1]}))
    return in_client(state, sys.executable, "-m", "flambe_iac.cli.deploy", "--outputs", str(trimmed),
                     "--key", str(lab_dir / model.USER_KEY_FILE), "--known-hosts",
                     str(lab_dir / model.KNOWN_HOSTS_FILE), *arguments)
