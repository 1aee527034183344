"""Large resources against plain rsync, in this one run: a first run (fresh hosts, an empty checksum cache), a re-run
with nothing changed, and a re-run after one 1 MB file changed, for each size; then a tree of many small files, with
the client's peak memory. Prints medians and ratios. The hosts share this machine's disk: a size that does not fit
on as many hosts as asked goes to fewer, and says so.

Run as root: .venv/bin/python bench/bigdata.py [--gigabytes 2 20] [--hosts 4] [--small-files 100000] [--repeats 3]
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

from lab_runs import clear_resources, deploy_command, plain_parallel_rsync, reset_hosts, run_measured

PART = 512 * 2**20
CHUNK = 64 * 2**20
SMALL_FILES_CHANGED = 16  # 1 MB files beside the large parts, one of which each "one changed" run rewrites


def make_large_resource(directory: Path, gigabytes: float) -> Path:
    """Parts of 512 MiB (incompressible, all different) and 16 files of 1 MB."""
    directory.mkdir()
    block = bytearray(os.urandom(CHUNK))
    for part in range(max(1, round(gigabytes * 2**30 / PART))):
        with open(directory / f"part-{part:03}.bin", "wb") as stream:
            for chunk in range(PART // CHUNK):
                block[:16] = f"{part:08}{chunk:08}".encode()
                stream.write(block)
    for index in range(SMALL_FILES_CHANGED):
        (directory / f"small-{index:02}.bin").write_bytes(os.urandom(2**20))
    return directory


def make_small_files(directory: Path, count: int) -> Path:
    """COUNT files of 1-4 KiB in directories of 1,000."""
    for index in range(count):
        folder = directory / f"d{index // 1000:04}"
        if index % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"f{index:06}.txt").write_bytes(os.urandom(1024 + index % 3072))
    return directory


def change_one_file(resource: Path, run: int) -> None:
    (resource / f"small-{run % SMALL_FILES_CHANGED:02}.bin").write_bytes(os.urandom(2**20))


def hosts_that_fit(work: Path, gigabytes: float, wanted: int) -> int:
    free = shutil.disk_usage(work).free / 2**30 - 4  # keep 4 GiB spare
    return max(0, min(wanted, int(free / (gigabytes * 1.05))))


def measure_large(lab_dir, state, work: Path, gigabytes: float, hosts: int, repeats: int, home: Path) -> None:
    resource = make_large_resource(work / f"data-{gigabytes:g}", gigabytes)
    environment = {**os.environ, "HOME": str(home)}
    deploy = deploy_command(lab_dir, state, work, hosts, "--resource", f"data={resource}", "--fan-out", "direct")
    plain = plain_parallel_rsync(lab_dir, state, [host.address for host in state.hosts[:hosts]], resource)
    times: dict[str, list[float]] = {case: [] for case in ("first", "rerun", "changed", "plain first", "plain rerun",
                                                           "plain changed")}
    for run in range(repeats):
        reset_hosts(lab_dir, state)
        shutil.rmtree(home / ".flambe", ignore_errors=True)
        times["first"].append(run_measured(deploy, environment)[0])
        times["rerun"].append(run_measured(deploy, environment)[0])
        change_one_file(resource, 2 * run)
        times["changed"].append(run_measured(deploy, environment)[0])
        clear_resources(lab_dir, state)
        times["plain first"].append(run_measured(plain)[0])
        times["plain rerun"].append(run_measured(plain)[0])
        change_one_file(resource, 2 * run + 1)
        times["plain changed"].append(run_measured(plain)[0])
    median = {case: statistics.median(values) for case, values in times.items()}
    print(f"  {gigabytes:g} GB to {hosts} hosts, medians of {repeats}:")
    for case in ("first", "rerun", "changed"):
        print(f"    {case:>7}: flambe-deploy {median[case]:.2f} s, plain rsync {median['plain ' + case]:.2f} s, "
              f"ratio {median[case] / median['plain ' + case]:.2f}x, difference "
              f"{median[case] - median['plain ' + case]:+.2f} s")
    clear_resources(lab_dir, state)
    shutil.rmtree(resource)


def measure_small_files(lab_dir, state, work: Path, count: int, hosts: int, repeats: int, home: Path) -> None:
    resource = make_small_files(work / "small", count)
    environment = {**os.environ, "HOME": str(home)}
    deploy = deploy_command(lab_dir, state, work, hosts, "--resource", f"data={resource}", "--fan-out", "direct")
    plain = plain_parallel_rsync(lab_dir, state, [host.address for host in state.hosts[:hosts]], resource)
    times: dict[str, list[float]] = {"first": [], "rerun": [], "plain first": [], "plain rerun": []}
    peaks = []
    for _ in range(repeats):
        reset_hosts(lab_dir, state)
        shutil.rmtree(home / ".flambe", ignore_errors=True)
        seconds, peak, _, _ = run_measured(deploy, environment)
        times["first"].append(seconds)
        seconds, rerun_peak, _, _ = run_measured(deploy, environment)
        times["rerun"].append(seconds)
        peaks += [peak, rerun_peak]
        clear_resources(lab_dir, state)
        times["plain first"].append(run_measured(plain)[0])
        times["plain rerun"].append(run_measured(plain)[0])
    median = {case: statistics.median(values) for case, values in times.items()}
    print(f"  {count:,} small files ({sum(path.stat().st_size for path in resource.rglob('*.txt')) / 1e6:.0f} MB) "
          f"to {hosts} hosts, medians of {repeats}:")
    for case in ("first", "rerun"):
        print(f"    {case:>7}: flambe-deploy {median[case]:.2f} s, plain rsync {median['plain ' + case]:.2f} s, "
              f"ratio {median[case] / median['plain ' + case]:.2f}x")
    print(f"    client peak memory (flambe-deploy with its rsync and ssh): {max(peaks) / 1024:.0f} MiB")
    clear_resources(lab_dir, state)
    shutil.rmtree(resource)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, nargs="*", default=[2, 20])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--small-files", type=int, default=100_000, help="0 to leave the small-files case out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats for sizes of 10 GB and more")
    arguments = parser.parse_args()
    build.check_can_run_lab()
    work = Path(tempfile.mkdtemp(prefix="flambe-bench-bigdata-", dir="/var/tmp"))
    lab_dir, home = work / "lab", work / "home"
    home.mkdir()
    state = build.up(lab_dir, arguments.hosts)
    try:
        print(f"resources against a plain parallel rsync to the same hosts, no link limit (this machine: "
              f"{os.cpu_count()} cores, the hosts share them and its disk)")
        for gigabytes in arguments.gigabytes:
            hosts = hosts_that_fit(work, gigabytes, arguments.hosts + 1) - 1
            if hosts < 1:
                print(f"  {gigabytes:g} GB: left out, the disk has no room for it and a copy")
                continue
            if hosts < arguments.hosts:
                print(f"  {gigabytes:g} GB: {hosts} hosts, not {arguments.hosts}: the disk has room for no more copies")
            repeats = arguments.large_repeats if gigabytes >= 10 else arguments.repeats
            measure_large(lab_dir, state, work, gigabytes, hosts, repeats, home)
        if arguments.small_files:
            measure_small_files(lab_dir, state, work, arguments.small_files, arguments.hosts, arguments.repeats, home)
    finally:
        teardown.down(lab_dir)
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
