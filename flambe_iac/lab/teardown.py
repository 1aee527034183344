"""Taking a lab down: stopping every process in its namespaces, reaping them, and deleting the namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from flambe_iac.lab.model import NETNS_PREFIX, LabState, host_dir
from flambe_iac.lab.network import ip_batch

STOP_TIMEOUT = 5.0
REAP_TIMEOUT = 20.0  # init may reap orphans only every second or two, and slower on a busy machine


def down(lab_dir: Path) -> list[str]:
    """Stop every process in the lab's namespaces and delete the namespaces. Safe to repeat."""
    lab_dir = lab_dir.resolve()
    state = LabState.load(lab_dir)
    if state is None:
        return []
    namespaces = lab_namespaces(state.lab_id)
    stop_processes(namespace_pids(namespaces))
    if namespaces:
        ip_batch(None, [f"netns delete {name}" for name in namespaces])
    for host in state.hosts:
        host.pid = None
        (host_dir(lab_dir, host) / "sshd.pid").unlink(missing_ok=True)
        home = host_dir(lab_dir, host) / "home"
        if os.path.ismount(home):
            subprocess.run(["umount", str(home)], check=True, capture_output=True)
    state.status = "down"
    state.save(lab_dir)
    return namespaces


def lab_namespaces(lab_id: str) -> list[str]:
    """Every namespace of this lab that exists now, whether or not `up` got to record it."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"{NETNS_PREFIX}{lab_id}-")]


def namespace_pids(namespaces: list[str]) -> set[int]:
    """Only processes the lab started live in its namespaces: sshd, its sessions and `exec` commands."""
    pids = set()
    for name in namespaces:
        listing = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
        pids.update(int(pid) for pid in listing.split())
    return pids


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); reap it if it is our child.
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        return reaped == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in _process_state(pid)


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def stop_processes(pids: set[int]) -> None:
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        if pid_alive(pid):
            _signal(pid, signal.SIGKILL)
    wait_until_reaped(pids)


def wait_until_reaped(pids: set[int]) -> None:
    """Orphans are reaped by init, which may take a moment; wait so `down` leaves no zombie either."""
    deadline = time.monotonic() + REAP_TIMEOUT
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
