"""What "busy" means on a member, measured from /proc and nvidia-smi, and read as untrusted text.

Each reading is a pure function of the text it reads, so it can be tested on any bytes; `measure` gathers them.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from flambe_iac.agent.commands import run_quietly

GPU_QUERY = ("nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits")
GPU_TIMEOUT = 10
MAX_GPU_ANSWER = 1 << 14  # a line per GPU
GPU_UNREADABLE = "unreadable"  # nvidia-smi is there but says nothing usable (an error, MIG's [N/A]): maybe busy
PROBE_MARK = "flambe-autostop-probe"  # in the command of the agents' own SSH sessions, which are not work
NEW_SESSION_SECONDS = 5.0  # a session this young may be a probe whose shell has not started yet


@dataclass(frozen=True)
class Thresholds:
    gpu_percent: float = 10.0  # any GPU above this utilization is busy
    cpu_cores: float = 0.5  # the machine's CPU use above this many cores is busy


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


def gpu_utilizations(text: str) -> list[float]:
    """Each GPU's utilization in percent, from nvidia-smi's csv; lines that are not a number (`[N/A]`, errors) are
    left out."""
    found = []
    for line in text.splitlines():
        try:
            value = float(line.strip().rstrip("%").strip())
        except ValueError:
            continue
        if 0 <= value <= 100:
            found.append(value)
    return found


def cpu_times(text: str) -> CpuTimes | None:
    """The machine's busy and total jiffies from /proc/stat's `cpu` line (idle and iowait are not busy)."""
    for line in text.splitlines():
        fields = line.split()
        if fields[:1] == ["cpu"] and len(fields) >= 5 and all(field.isdigit() for field in fields[1:]):
            numbers = [int(field) for field in fields[1:9]]
            idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)
            return CpuTimes(busy=sum(numbers) - idle, total=sum(numbers))
    return None


def machine_cpu(proc: Path = Path("/proc")) -> CpuTimes | None:
    """The machine's CPU times now, or None if /proc/stat cannot be read."""
    try:
        return cpu_times((proc / "stat").read_text(errors="replace"))
    except OSError:
        return None


def busy_cores(before: CpuTimes | None, after: CpuTimes | None, cores: int) -> float | None:
    if before is None or after is None or after.total <= before.total:
        return None
    return max(0.0, (after.busy - before.busy) / (after.total - before.total) * cores)


def session_owner(cmdline: str) -> str | None:
    """The user of an sshd session process (`sshd: alice@pts/0`, `sshd-session: alice@notty`), else None."""
    match = re.match(r"sshd(?:-session)?: ([^@\s]+)@\S+$", cmdline.strip())
    return match.group(1) if match else None


def is_ray_task(cmdline: str) -> bool:
    """A Ray worker running a task or holding an actor: its title is `ray::NAME`; an idle worker's is `ray::IDLE`."""
    return cmdline.startswith("ray::") and not cmdline.startswith("ray::IDLE")


@dataclass(frozen=True)
class Process:
    pid: int
    parent: int
    cmdline: str
    age: float = 3600.0  # seconds since it started


def processes(proc: Path = Path("/proc")) -> list[Process]:
    """Every process this PID namespace shows; those that end while read are left out."""
    found = []
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        uptime = float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        uptime = None
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (proc / entry.name / "cmdline").read_bytes()[:4096].replace(b"\0", b" ")
            stat = (proc / entry.name / "stat").read_text(errors="replace").rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(stat) < 20 or not stat[1].isdigit() or not stat[19].isdigit():
            continue
        age = uptime - int(stat[19]) / ticks if uptime is not None else 3600.0
        found.append(Process(int(entry.name), int(stat[1]), cmdline.decode(errors="replace").strip(), age))
    return found


def open_sessions(found: list[Process], user: str) -> int:
    """USER's SSH sessions, but for those that run only an agent's probe (the orchestrator's agent reading a
    factory's state is not work): the session's commands are all marked, or it is seconds old and runs nothing yet."""
    children: dict[int, list[Process]] = {}
    for process in found:
        children.setdefault(process.parent, []).append(process)

    def is_probe(session: Process) -> bool:
        commands = children.get(session.pid, [])
        if not commands:
            return session.age < NEW_SESSION_SECONDS
        return all(PROBE_MARK in command.cmdline for command in commands)

    return sum(1 for process in found if session_owner(process.cmdline) == user and not is_probe(process))


def runnable_alive(home: Path, proc: Path = Path("/proc")) -> bool:
    """The runnable flambe-deploy --run started here still runs: its pid file names a live process that is the
    runner (after a reboot the pid may be another's), and it left no exit code."""
    try:
        pid = (home / ".flambe" / "run.pid").read_text().strip()
    except OSError:
        return False
    if not pid.isdigit() or (home / ".flambe" / "run.exit").exists():
        return False
    try:
        state = (proc / pid / "stat").read_text().rsplit(")", 1)[-1].split()[:1]
        cmdline = (proc / pid / "cmdline").read_bytes()
    except OSError:
        return False
    return state != ["Z"] and b"flambe_iac.runnable" in cmdline


def gpu_reading(timeout: float = GPU_TIMEOUT) -> list[float] | str | None:
    """Each GPU's utilization now; GPU_UNREADABLE where nvidia-smi fails, does not answer within TIMEOUT or gives no
    number; None without it."""
    if shutil.which(GPU_QUERY[0]) is None:
        return None
    result = run_quietly(GPU_QUERY, timeout, MAX_GPU_ANSWER)
    found = gpu_utilizations(result.stdout) if result is not None and result.returncode == 0 else []
    return found or GPU_UNREADABLE


def busy_signals(thresholds: Thresholds, user: str, home: Path, cores_busy: float | None,
                 gpus: list[float] | str | None, found: list[Process]) -> list[str]:
    """The signals that say work goes on, in words; empty when the member is idle. A GPU that cannot be read counts
    as busy: a member wrongly stopped loses its work, one wrongly kept costs only time (the alarms are the backstop)."""
    signals = []
    if gpus == GPU_UNREADABLE:
        signals.append("gpu unreadable")
    elif gpus and max(gpus) > thresholds.gpu_percent:
        signals.append(f"gpu {max(gpus):.0f}%")
    if cores_busy is not None and cores_busy > thresholds.cpu_cores:
        signals.append(f"cpu {cores_busy:.2f} cores")
    sessions = open_sessions(found, user)
    if sessions:
        signals.append(f"{sessions} ssh session{'s' if sessions != 1 else ''}")
    if runnable_alive(home):
        signals.append("runnable running")
    tasks = sum(1 for process in found if is_ray_task(process.cmdline))
    if tasks:
        signals.append(f"{tasks} ray task{'s' if tasks != 1 else ''}")
    return signals
