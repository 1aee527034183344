"""flambe-deploy's start-up, in fresh processes: the medians of RUNS runs each of `--version`, of `import
flambe_iac.cli.deploy`, of `check --help`, and of the imports a deploy adds once it runs (gevent's patch, then
flambe_iac.engine.driver: pyinfra, paramiko). No lab, no network.

With --baseline REV (a commit, e.g. HEAD~1), that commit's tree is measured too, in the same turns (this tree, then
the other, run after run), so that both see the same load on the machine; its medians are printed beside these.

    .venv/bin/python bench/startup.py [--runs 20] [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"

PROBES = {
    "flambe-deploy --version": ["-m", "flambe_iac.cli.deploy", "--version"],
    "import flambe_iac.cli.deploy": ["-c", "import flambe_iac.cli.deploy"],
    "flambe-deploy check --help": ["-m", "flambe_iac.cli.deploy", "check", "--help"],
    "a deploy's imports (+ driver)": ["-c", "from gevent import monkey; monkey.patch_all(); "
                                            "import flambe_iac.cli.deploy, flambe_iac.engine.driver"],
}


def seconds_of(tree: Path, arguments: list[str]) -> float:
    environment = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    subprocess.run([str(PYTHON), *arguments], cwd=tree, env=environment, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def checkout(revision: str, into: Path) -> Path:
    """REVISION's tree, laid out as the editable install sees this one (deploys/ and stacks/ inside the package)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for name in ("deploys", "stacks"):
        link = into / "flambe_iac" / name
        if not link.exists():
            link.symlink_to(into / name)
    return into


def measure(trees: dict[str, Path], runs: int) -> dict[str, dict[str, list[float]]]:
    for tree in trees.values():  # compile once, outside the timings
        subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(tree / "flambe_iac")], check=True)
    timings = {name: {probe: [] for probe in PROBES} for name in trees}
    for _ in range(runs):
        for probe, arguments in PROBES.items():
            for name, tree in trees.items():
                timings[name][probe].append(seconds_of(tree, arguments))
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--baseline", metavar="REV", help="also measure this commit's tree, in turns with this one")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this tree": ROOT}
        if arguments.baseline:
            trees[arguments.baseline] = checkout(arguments.baseline, Path(scratch))
        timings = measure(trees, arguments.runs)
    print(f"medians of {arguments.runs} runs, in ms (the fastest in brackets)")
    print(f"{'':32}" + "".join(f"{name:>20}" for name in trees))
    for probe in PROBES:
        cells = [f"{statistics.median(timings[name][probe]) * 1000:8.0f} ({min(timings[name][probe]) * 1000:4.0f})"
                 for name in trees]
        print(f"{probe:32}" + "".join(f"{cell:>20}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
