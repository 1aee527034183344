"""Fan-out: first runs of flambe-deploy with --fan-out direct, relay, tree and auto (the default), and a plain parallel
rsync to every host, in three lab settings, all measured in this one run. Prints medians and ratios.

1. every link (the client's and each host's) at --mbit, a resource of --megabytes in 1 MB files, 4, 8 and 16 hosts,
   and one host alone: how far each fan-out stays from one host's time as the cluster grows;
2. no link limit, 5 MB and 50 small files, 4, 8 and 16 hosts: what the hops cost where links are fast;
3. only the client's uplink at --mbit, 20 MB, 8 hosts: what crossing the uplink once saves.

Run as root: .venv/bin/python bench/fanout.py [--hosts 4 8 16] [--megabytes 50] [--mbit 100] [--repeats 2]
             [--settings 1 2 3]
             [--modes direct relay tree auto] [--one-file] [--without-plain]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from flambe_iac.lab import build, teardown

from lab_runs import clear_resources, deploy_command, plain_parallel_rsync, timed

MODES = ("direct", "relay", "tree", "auto")


def make_resource(directory: Path, megabytes: int, small_files: int = 0, one_file: bool = False) -> Path:
    """MEGABYTES of incompressible 1 MB files (one file if less, or if ONE_FILE), and SMALL_FILES files of 1 KiB."""
    directory.mkdir()
    sizes = [1_000_000] * megabytes if megabytes > 1 and not one_file else [int(megabytes * 1_000_000)]
    for index, size in enumerate(sizes):
        (directory / f"part-{index:03}.bin").write_bytes(os.urandom(size))
    for index in range(small_files):
        (directory / f"small-{index:03}.txt").write_bytes(os.urandom(1024))
    return directory


def measure(work: Path, title: str, host_counts: list[int], resource: Path, repeats: int, alone: bool,
            modes: tuple[str, ...] = MODES, with_plain: bool = True, **limits) -> None:
    lab_dir = work / "lab"
    state = build.up(lab_dir, max(host_counts), **limits)
    try:
        print(title)
        one = None
        if alone:
            command = deploy_command(lab_dir, state, work, 1, "--resource", f"data={resource}")
            one = statistics.median([clear_resources(lab_dir, state) or timed(command) for _ in range(repeats)])
            print(f"  one host alone: {one:.2f} s")
        for hosts in host_counts:
            times = {mode: [] for mode in (*(("plain",) if with_plain else ()), *modes)}
            plain = plain_parallel_rsync(lab_dir, state, [host.address for host in state.hosts[:hosts]], resource)
            for _ in range(repeats):
                clear_resources(lab_dir, state)
                if with_plain:
                    times["plain"].append(timed(plain))
                for mode in modes:
                    clear_resources(lab_dir, state)
                    times[mode].append(timed(deploy_command(lab_dir, state, work, hosts, "--resource",
                                                            f"data={resource}", "--fan-out", mode)))
            median = {mode: statistics.median(values) for mode, values in times.items()}
            line = ", ".join(f"{mode} {median[mode]:.2f} s" for mode in median)
            ratios = ", ".join(f"{mode}/{other} {median[mode] / median[other]:.2f}x" for mode in modes
                               for other in ("plain", "direct") if other in median and other != mode)
            if one:
                ratios += ", / one host: " + ", ".join(f"{mode} {median[mode] / one:.2f}x" for mode in modes)
            print(f"  {hosts:>2} hosts: {line}\n            {ratios}")
    finally:
        teardown.down(lab_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--one-file", action="store_true", help="setting 1's resource as one file, not 1 MB files")
    parser.add_argument("--without-plain", action="store_true", help="leave out the plain parallel rsync")
    arguments = parser.parse_args()
    build.check_can_run_lab()
    work = Path(tempfile.mkdtemp(prefix="flambe-bench-fanout-", dir="/var/tmp"))
    mbit = arguments.mbit
    try:
        print(f"medians of {arguments.repeats} first runs; this machine has {os.cpu_count()} cores, which the hosts "
              "share")
        if 1 in arguments.settings:
            files = "one file" if arguments.one_file else "1 MB files"
            measure(work, f"1. every link at {mbit:g} Mbit/s, {arguments.megabytes} MB in {files}:",
                    arguments.hosts, make_resource(work / "large", arguments.megabytes, one_file=arguments.one_file),
                    arguments.repeats,
                    alone=True, modes=tuple(arguments.modes), with_plain=not arguments.without_plain,
                    uplink_mbit=mbit, host_mbit=mbit)
        if 2 in arguments.settings:
            measure(work, "2. no link limit, 5 MB and 50 small files:", arguments.hosts,
                    make_resource(work / "small", 5, small_files=50), arguments.repeats, alone=False,
                    modes=tuple(arguments.modes))
        if 3 in arguments.settings:
            measure(work, f"3. only the client's uplink at {mbit:g} Mbit/s, 20 MB:", [8],
                    make_resource(work / "uplink", 20), arguments.repeats, alone=False, modes=tuple(arguments.modes),
                    uplink_mbit=mbit)
    finally:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
