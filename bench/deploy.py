"""flambe-deploy on lab hosts: wall time and peak memory for 1, 4, 16 and 32 hosts, first runs and re-runs,
and how fast `flambe-deploy --help` starts. Prints medians and ratios from this one run. Transfers are direct
(--fan-out direct): on the lab's unlimited links the relay only adds a hop; bench/relay.py measures it behind an
uplink.

Run as root: .venv/bin/python bench/deploy.py [--repeats 3] [--baseline DIR]

With --baseline DIR (a directory holding another flambe_iac package, for example an earlier commit's
`flambe_iac/` with its `deploys/` copied in as `flambe_iac/deploys/`), each case is measured with both, in turns, and
the ratio current/baseline is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from flambe_iac.lab import build, model, teardown

from lab_runs import reset_hosts, run_measured

SIZES = (1, 4, 16, 32)


def make_inputs(directory: Path, resource_kib: int) -> tuple[Path, Path]:
    """A secrets file, and a resource of 20 files of random bytes (incompressible, so rsync moves them all)."""
    secrets = directory / "secrets.ini"
    secrets.write_text("[aws]\nsecret = bench\n")
    resource = directory / "data"
    resource.mkdir()
    for index in range(20):
        (resource / f"part-{index:02}.bin").write_bytes(os.urandom(resource_kib * 1024 // 20))
    return secrets, resource


def measure_sizes(lab_dir: Path, state: model.LabState, outputs: dict, secrets: Path, resource: Path, repeats: int,
                  work: Path, baseline: Path | None, sizes: list[int]) -> None:
    results = {}
    for size in sizes:
        trimmed = work / f"outputs-{size}.json"
        trimmed.write_text(json.dumps({**outputs, "factories": outputs["factories"][: size - 1]}))
        command = ["ip", "netns", "exec", state.client_netns, sys.executable, "-m", "flambe_iac.cli.deploy",
                   "--outputs", str(trimmed), "--key", str(lab_dir / model.USER_KEY_FILE),
                   "--known-hosts", str(lab_dir / model.KNOWN_HOSTS_FILE), "--secrets", str(secrets),
                   "--resource", f"data={resource}", "--fan-out", "direct"]
        first, rerun, memory, client_cpu, busy = [], [], [], [], []
        old_first, old_rerun = [], []
        for _ in range(repeats):
            reset_hosts(lab_dir, state)
            seconds, peak, cpu_seconds, machine_busy = run_measured(command)
            first.append(seconds)
            memory.append(peak)
            client_cpu.append(cpu_seconds)
            busy.append(machine_busy)
            rerun.append(run_measured(command)[0])
            if baseline is not None:
                old = {**os.environ, "PYTHONPATH": str(baseline)}
                old_command = command[:command.index("--fan-out")]  # an earlier flambe-deploy knows only direct
                reset_hosts(lab_dir, state)
                old_first.append(run_measured(old_command, old)[0])
                old_rerun.append(run_measured(old_command, old)[0])
        results[size] = (statistics.median(first), statistics.median(rerun))
        print(f"  {size:>2} hosts: first run {results[size][0]:.2f} s, re-run {results[size][1]:.2f} s "
              f"({results[size][1] / results[size][0]:.0%} of first), peak memory {max(memory) / 1024:.0f} MiB, "
              f"client CPU {statistics.median(client_cpu):.2f} s, machine CPU busy {statistics.median(busy):.0%}")
        if baseline is not None:
            print(f"      baseline: first run {statistics.median(old_first):.2f} s, re-run "
                  f"{statistics.median(old_rerun):.2f} s; current/baseline {results[size][0] / statistics.median(old_first):.2f}x "
                  f"and {results[size][1] / statistics.median(old_rerun):.2f}x")
    if len(sizes) > 1:
        print(f"  {sizes[-1]} hosts / {sizes[0]} host(s), first run: {results[sizes[-1]][0] / results[sizes[0]][0]:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resource-kib", type=int, nargs="+", default=[64, 5120],
                        help="resource sizes to measure, in KiB (default: 64 and 5120)")
    parser.add_argument("--hosts", type=int, nargs="+", default=list(SIZES), help="cluster sizes (default 1 4 16 32)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also measure the flambe_iac package in DIR, in turns with this one")
    arguments = parser.parse_args()
    build.check_can_run_lab()
    work = Path(tempfile.mkdtemp(prefix="flambe-bench-"))
    lab_dir = work / "lab"
    state = build.up(lab_dir, max(arguments.hosts))
    try:
        outputs = json.loads((lab_dir / model.OUTPUTS_FILE).read_text())
        for resource_kib in arguments.resource_kib:
            print(f"resource of {resource_kib} KiB, secrets, cluster key; medians of {arguments.repeats} runs:")
            inputs = work / f"inputs-{resource_kib}"
            inputs.mkdir()
            measure_sizes(lab_dir, state, outputs, *make_inputs(inputs, resource_kib), arguments.repeats, work,
                          arguments.baseline, sorted(arguments.hosts))
        help_times = [run_measured([sys.executable, "-m", "flambe_iac.cli.deploy", "--help"])[0] for _ in range(20)]
        print(f"flambe-deploy --help: median {statistics.median(help_times):.3f} s (20 runs)")
    finally:
        teardown.down(lab_dir)
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
