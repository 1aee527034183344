"""flambe-deploy on lab hosts: wall time and peak memory for 1, 4, 16 and 32 hosts, first runs and re-runs,
and how fast `flambe-deploy --help` starts. Prints medians and ratios from this one run.

Run as root: .venv/bin/python bench/deploy.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flambe_iac import lab

SIZES = (1, 4, 16, 32)


def run_measured(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident memory (KiB) of one command, its children included."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(argv)}\n{process.stderr.read().decode()}")
    return elapsed, usage.ru_maxrss


def reset_hosts(lab_dir: Path, state: lab.LabState) -> None:
    """Put every home back as `flambe-lab up` left it, so the next deploy is a first run."""
    user_key = (lab_dir / lab.USER_KEY_FILE).with_suffix(".pub").read_text()
    for host in state.hosts:
        home = lab.host_dir(lab_dir, host) / "home" / state.user
        for entry in home.iterdir():
            if entry.name != ".ssh":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in (home / ".ssh").iterdir():
            if entry.name != "authorized_keys":
                entry.unlink()
        (home / ".ssh" / "authorized_keys").write_text(user_key)


def make_inputs(directory: Path) -> tuple[Path, Path]:
    secrets = directory / "secrets.ini"
    secrets.write_text("[aws]\nsecret = bench\n")
    resource = directory / "data"
    resource.mkdir()
    for index in range(20):
        (resource / f"part-{index:02}.bin").write_bytes(os.urandom(256 * 1024))
    return secrets, resource


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    lab.check_can_run_lab()
    work = Path(tempfile.mkdtemp(prefix="flambe-bench-"))
    lab_dir = work / "lab"
    state = lab.up(lab_dir, max(SIZES))
    try:
        secrets, resource = make_inputs(work)
        outputs = json.loads((lab_dir / lab.OUTPUTS_FILE).read_text())
        results = {}
        for size in SIZES:
            trimmed = work / f"outputs-{size}.json"
            trimmed.write_text(json.dumps({**outputs, "factories": outputs["factories"][: size - 1]}))
            command = ["ip", "netns", "exec", state.client_netns, sys.executable, "-m", "flambe_iac.deploy_cli",
                       "--outputs", str(trimmed), "--key", str(lab_dir / lab.USER_KEY_FILE),
                       "--known-hosts", str(lab_dir / lab.KNOWN_HOSTS_FILE), "--secrets", str(secrets),
                       "--resource", f"data={resource}"]
            first, rerun, memory = [], [], []
            for _ in range(arguments.repeats):
                reset_hosts(lab_dir, state)
                seconds, peak = run_measured(command)
                first.append(seconds)
                memory.append(peak)
                rerun.append(run_measured(command)[0])
            results[size] = (statistics.median(first), statistics.median(rerun), max(memory))
            print(f"{size:>2} hosts: first run {results[size][0]:.2f} s, re-run {results[size][1]:.2f} s "
                  f"({results[size][1] / results[size][0]:.0%} of first), peak memory {results[size][2] / 1024:.0f} MiB")
        print(f"32 hosts / 1 host, first run: {results[32][0] / results[1][0]:.2f}x")
        help_times = [run_measured([sys.executable, "-m", "flambe_iac.deploy_cli", "--help"])[0] for _ in range(20)]
        print(f"flambe-deploy --help: median {statistics.median(help_times):.3f} s (20 runs)")
    finally:
        lab.down(lab_dir)
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
