"""--ray against starting Ray by hand, on lab hosts: in this one run, the medians of
  - by hand: ssh to the orchestrator to write a token and `ray start --head`, then to every factory at once to write
    it and `ray start --address` (what a user without flambe-deploy runs, with the same options);
  - flambe-deploy --ray on hosts where Ray is stopped (first run), and again with Ray running (re-run);
  - flambe-deploy --ray-stop;
and the memory the Ray processes of each host take once running. Prints medians and ratios.

Run as root: .venv/bin/python bench/ray.py [--hosts 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from relay import timed  # bench/, the script's own directory

from flambe_iac.engine.ray_cluster import GCS_PORT, new_ray_token, start_command
from flambe_iac.lab import build, model, teardown
from flambe_iac.ssh.policy import SshTarget, ssh_options

ROOT = Path(__file__).resolve().parents[1]


def by_hand(lab_dir: Path, state: model.LabState, python: str) -> list[str]:
    """One ssh to the head, then one to each worker at once: token, then `ray start`, with our options."""
    token = new_ray_token().decode()
    head = state.hosts[0].address

    def ssh(address: str, command: str) -> str:
        target = SshTarget(address, state.user, lab_dir / model.USER_KEY_FILE, lab_dir / model.KNOWN_HOSTS_FILE)
        write_token = f"umask 077; mkdir -p .ray; printf %s {token} > .ray/auth_token; "
        return shlex.join(["ssh", *ssh_options(target), f"{state.user}@{address}", write_token + command])

    head_start = ssh(head, start_command(python, head, head, "{}", "by-hand"))
    workers = [ssh(host.address, start_command(python, host.address, head, "{}", "by-hand", "2.60.0"))
               for host in state.hosts[1:]]
    script = f"{head_start} >/dev/null && {{ {' & '.join(workers)} & wait; }} >/dev/null"
    return ["ip", "netns", "exec", state.client_netns, "sh", "-c", script]


def ray_memory_mib(lab_dir: Path, state: model.LabState) -> list[float]:
    """Resident memory of each host's processes other than sshd and its sessions."""
    sizes = []
    for host in state.hosts:
        total = 0
        for pid in teardown.namespace_pids([host.netns]):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if name.startswith(("sshd", "bash", "sh", "unshare")):
                continue
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        sizes.append(total / 1024)
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    build.check_can_run_lab()
    python = subprocess.run([str(ROOT / "scripts" / "lab-ray-python")], capture_output=True, text=True,
                            check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="flambe-bench-ray-"))
    lab_dir = work / "lab"
    state = build.up(lab_dir, arguments.hosts)
    try:
        deploy = ["ip", "netns", "exec", state.client_netns, "env", f"HOME={work}", sys.executable, "-m",
                  "flambe_iac.cli.deploy", "--outputs", str(lab_dir / model.OUTPUTS_FILE), "--key",
                  str(lab_dir / model.USER_KEY_FILE), "--known-hosts", str(lab_dir / model.KNOWN_HOSTS_FILE)]
        start, stop = [*deploy, "--ray", "--ray-python", python], [*deploy, "--ray-stop", "--ray-python", python]
        timed(stop)  # the cluster key and manifest in place: what follows times Ray alone
        times: dict[str, list[float]] = {"by hand": [], "first": [], "re-run": [], "stop": []}
        memory = []
        for _ in range(arguments.repeats):
            times["by hand"].append(timed(by_hand(lab_dir, state, python)))
            timed(stop)
            times["first"].append(timed(start))
            memory.append(ray_memory_mib(lab_dir, state))
            times["re-run"].append(timed(start))
            times["stop"].append(timed(stop))
        median = {name: statistics.median(values) for name, values in times.items()}
        print(f"Ray on {arguments.hosts} lab hosts (head port {GCS_PORT}), medians of {arguments.repeats}:")
        print(f"  by hand (ssh + ray start, head then workers at once): {median['by hand']:.2f} s")
        print(f"  flambe-deploy --ray, Ray stopped: {median['first']:.2f} s "
              f"({median['first'] / median['by hand']:.2f}x by hand)")
        print(f"  flambe-deploy --ray, Ray running (unchanged): {median['re-run']:.2f} s "
              f"({median['re-run'] / median['first']:.0%} of the first run)")
        print(f"  flambe-deploy --ray-stop: {median['stop']:.2f} s")
        per_host = [statistics.median(run[index] for run in memory) for index in range(arguments.hosts)]
        print(f"  memory of Ray's processes: head {per_host[0]:.0f} MiB, workers "
              f"{', '.join(f'{size:.0f}' for size in per_host[1:])} MiB; {sum(per_host) / 1024:.2f} GiB in all")
    finally:
        teardown.down(lab_dir)
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
