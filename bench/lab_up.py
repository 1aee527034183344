"""How long `flambe-lab up` takes, for 1 and 32 hosts: medians of several runs, and their ratio.

Run as root: .venv/bin/python bench/lab_up.py [--repeats 5]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flambe_iac.lab import build, teardown


def time_up(host_count: int, repeats: int) -> list[float]:
    durations = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="flambe-bench-") as directory:
            started = time.perf_counter()
            build.up(Path(directory), host_count)
            durations.append(time.perf_counter() - started)
            teardown.down(Path(directory))
    return durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    build.check_can_run_lab()
    medians = {}
    for host_count in (1, 32):
        durations = time_up(host_count, arguments.repeats)
        medians[host_count] = statistics.median(durations)
        print(f"flambe-lab up, {host_count:>2} hosts: median {medians[host_count]:.3f} s "
              f"(min {min(durations):.3f}, max {max(durations):.3f}, {arguments.repeats} runs)")
    print(f"32 hosts / 1 host: {medians[32] / medians[1]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
