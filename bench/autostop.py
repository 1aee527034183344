"""The autostop agent's costs, on lab hosts: a deploy with --autostop against one without (16 hosts, first runs and
re-runs), and the agent's own CPU and memory on a host, at its production pace (a sample a minute) and at a sample a
second, with a few hundred processes on the host to scan. Prints medians and ratios from this one run.

Run as root: .venv/bin/python bench/autostop.py [--hosts 16] [--repeats 3] [--watch-seconds 180]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flambe_iac.lab import build, model, teardown

from lab_runs import deploy_command, reset_hosts, run_measured

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
PAGE_PROCESSES = 300  # extra processes on the watched host, for the agent to scan each sample


def agent_pids(state: model.LabState, host: model.LabHost) -> list[int]:
    """The machine's pids of HOST's autostop agents."""
    listing = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout.split()
    found = []
    for pid in listing:
        try:
            if b"flambe_iac.agent\0run" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def stop_agents(lab_dir: Path, state: model.LabState) -> None:
    """Every agent ended and every crontab emptied, so that the next deploy installs them afresh."""
    for host in state.hosts:
        for pid in agent_pids(state, host):
            os.kill(pid, signal.SIGKILL)
        for table in (model.host_dir(lab_dir, host) / "crontabs").glob("*"):
            table.unlink()


def deploy_times(lab_dir: Path, state: model.LabState, work: Path, hosts: int, repeats: int, resource: Path,
                 secrets: Path) -> None:
    """Wall time, and the CPU the hosts spent (the machine's busy time less the client's): on this machine the
    hosts share its cores with the client, so their work lengthens the run; on EC2 each host has its own."""
    base = deploy_command(lab_dir, state, work, hosts, "--secrets", str(secrets), "--resource", f"data={resource}",
                          "--fan-out", "direct")
    cases = {"without": base, "with --autostop 30": [*base, "--autostop", "30"]}
    samples = {(run, name): [] for run in ("first run", "re-run") for name in cases}
    for repeat in range(repeats):
        for name in (list(cases) if repeat % 2 == 0 else list(reversed(cases))):
            stop_agents(lab_dir, state)
            reset_hosts(lab_dir, state)
            for run in ("first run", "re-run"):
                seconds, _, client_cpu, busy = run_measured(cases[name])
                samples[run, name].append((seconds, busy * seconds * CORES - client_cpu))
    print(f"deploy to {hosts} hosts (5 MiB resource, secrets), medians of {repeats}:")
    for run in ("first run", "re-run"):
        (without, without_hosts), (with_agent, with_hosts) = (
            (statistics.median(item[0] for item in samples[run, name]),
             statistics.median(item[1] for item in samples[run, name])) for name in cases)
        print(f"  {run:<10} without {without:6.2f} s   with --autostop {with_agent:6.2f} s   ratio "
              f"{with_agent / without:.3f}   the hosts' CPU {without_hosts:5.2f} s -> {with_hosts:5.2f} s "
              f"(+{1000 * (with_hosts - without_hosts) / hosts:.0f} ms a host)")


def process_cost(pid: int) -> tuple[float, int, int]:
    """(CPU seconds so far, resident KiB now, peak resident KiB) of PID."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return ((int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(status["VmRSS"].split()[0]),
            int(status["VmHWM"].split()[0]))


def agent_cost(lab_dir: Path, state: model.LabState, work: Path, minutes: str, seconds: float) -> None:
    stop_agents(lab_dir, state)
    reset_hosts(lab_dir, state)
    subprocess.run(deploy_command(lab_dir, state, work, 3, "--autostop", minutes, "--autostop-cpu", "64"),
                   check=True, capture_output=True)
    factory = state.hosts[1]
    (pid,) = agent_pids(state, factory)
    cpu_before, _, _ = process_cost(pid)
    time.sleep(seconds)
    cpu_after, resident, peak = process_cost(pid)
    used = cpu_after - cpu_before
    print(f"  --autostop {minutes:<4} ({'a sample a minute' if float(minutes) >= 6 else 'samples every second'}, "
          f"{seconds:.0f} s): CPU {used:.3f} s = {100 * used / seconds:.3f}% of one core; "
          f"memory {resident / 1024:.1f} MiB resident, {peak / 1024:.1f} MiB peak")


def crowd(state: model.LabState, host: model.LabHost) -> subprocess.Popen:
    """PAGE_PROCESSES sleeping processes on HOST, in its PID namespace, for the agent's scans to read."""
    sshd = host.pid
    return subprocess.Popen(["nsenter", "-t", str(sshd), "-p", "-m", "--", "sh", "-c",
                             f"for i in $(seq {PAGE_PROCESSES}); do sleep 3600 & done; wait"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--sizes", default="4,16", help="cluster sizes to time the deploy at (at most --hosts)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--watch-seconds", type=float, default=180.0)
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flambe-bench-autostop-"))
    lab_dir = work / "lab"
    state = build.up(lab_dir, arguments.hosts)
    crowded = None
    try:
        secrets = work / "secrets.ini"
        secrets.write_text("[aws]\nsecret = bench\n")
        resource = work / "data"
        resource.mkdir()
        for index in range(20):
            (resource / f"part-{index:02}.bin").write_bytes(os.urandom(5 * 1024 * 1024 // 20))
        for size in [int(text) for text in arguments.sizes.split(",")]:
            deploy_times(lab_dir, state, work, size, arguments.repeats, resource, secrets)
        crowded = crowd(state, state.hosts[1])
        print(f"the agent on one factory, with {PAGE_PROCESSES} more processes on it:")
        agent_cost(lab_dir, state, work, "30", arguments.watch_seconds)
        agent_cost(lab_dir, state, work, "0.1", 30.0)
    finally:
        if crowded is not None:
            os.killpg(crowded.pid, signal.SIGKILL)
        teardown.down(lab_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
