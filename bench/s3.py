"""Resources from S3: first runs and re-runs of flambe-deploy with --resource data=s3://..., against the same data as
a local resource through --stage-via (into an empty prefix each time) and --fan-out tree and relay, and plain
parallel rsync's re-run, all in this one run.

Every link (the client's and each host's) at --mbit; the lab's S3 stand-in (moto's server) has no link limit, and
its CPU is measured, since on this machine it is the stand-in, not S3, that serves every byte. The client's uplink
bytes are counted at its network interface. Prints medians and ratios.

Run as root: .venv/bin/python bench/s3.py [--hosts 1 4 16] [--megabytes 100] [--files 100] [--mbit 100]
             [--repeats 2] [--shapes one-file files] [--compare tree relay]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flambe_iac.lab import build, model, teardown

from lab_runs import clear_resources, deploy_command, in_client, plain_parallel_rsync, timed

SEED = """
import os, sys, boto3
s3 = boto3.client("s3")
s3.create_bucket(Bucket="bench")
root = sys.argv[1]
for name in sorted(os.listdir(root)):
    with open(os.path.join(root, name), "rb") as body:
        s3.put_object(Bucket="bench", Key=sys.argv[2] + "/" + name, Body=body, ChecksumAlgorithm="SHA256")
"""


def make_files(directory: Path, megabytes: int, files: int) -> Path:
    directory.mkdir()
    size = megabytes * 1_000_000 // files
    for index in range(files):
        (directory / f"part-{index:04}.bin").write_bytes(os.urandom(size))
    return directory


def client_sent_bytes(state: model.LabState) -> int:
    result = subprocess.run(in_client(state, "cat", "/sys/class/net/eth0/statistics/tx_bytes"), capture_output=True,
                            text=True, check=True)
    return int(result.stdout)


def stand_in_cpu_seconds(state: model.LabState) -> float:
    pids = subprocess.run(["ip", "netns", "pids", state.s3_netns], capture_output=True, text=True).stdout.split()
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def clear_pulls(lab_dir: Path, state: model.LabState) -> None:
    clear_resources(lab_dir, state)
    for host in state.hosts:
        shutil.rmtree(model.host_dir(lab_dir, host) / "home" / state.user / ".flambe" / "s3", ignore_errors=True)


class Bench:
    def __init__(self, lab_dir: Path, state: model.LabState, work: Path, environment: dict, repeats: int):
        self.lab_dir, self.state, self.work, self.environment, self.repeats = lab_dir, state, work, environment, repeats

    def first_runs(self, hosts: int, resource: str, *extra: str, vary=lambda repeat: ()) -> tuple[float, float, float]:
        """Median seconds, the client's bytes sent and the stand-in's CPU seconds, of first runs (VARY: arguments of
        each repeat's own, e.g. a --stage-via prefix that holds nothing yet)."""
        times, sent, cpu = [], [], []
        for repeat in range(self.repeats):
            clear_pulls(self.lab_dir, self.state)
            bytes_before, cpu_before = client_sent_bytes(self.state), stand_in_cpu_seconds(self.state)
            times.append(timed(deploy_command(self.lab_dir, self.state, self.work, hosts, "--resource", resource,
                                              *extra, *vary(repeat)), self.environment))
            sent.append(client_sent_bytes(self.state) - bytes_before)
            cpu.append(stand_in_cpu_seconds(self.state) - cpu_before)
        return statistics.median(times), statistics.median(sent), statistics.median(cpu)

    def rerun(self, hosts: int, resource: str) -> float:
        command = deploy_command(self.lab_dir, self.state, self.work, hosts, "--resource", resource)
        timed(command, self.environment)
        return statistics.median([timed(command, self.environment) for _ in range(self.repeats)])

    def plain_rerun(self, hosts: int, local: Path) -> float:
        command = plain_parallel_rsync(self.lab_dir, self.state, [host.address for host in self.state.hosts[:hosts]],
                                       local)
        timed(command)
        return statistics.median([timed(command) for _ in range(self.repeats)])


def measure_shape(bench: Bench, title: str, prefix: str, local: Path, host_counts: list[int],
                  compared: tuple[str, ...]) -> None:
    print(title)
    s3 = f"data=s3://bench/{prefix}"
    one = None
    for hosts in host_counts:
        seconds, sent, cpu = bench.first_runs(hosts, s3)
        one = one or seconds
        others = {mode: bench.first_runs(hosts, f"data={local}", "--fan-out", mode) for mode in compared}
        staged = bench.first_runs(hosts, f"data={local}",
                                  vary=lambda repeat: ("--stage-via", f"s3://bench/staged-{prefix}-{hosts}-{repeat}"))
        print(f"  {hosts:>2} hosts: s3 {seconds:.2f} s ({seconds / one:.2f}x one host; uplink {sent / 1e6:.2f} MB; "
              f"stand-in CPU {cpu:.1f} s = {cpu / seconds:.2f} cores); --stage-via {staged[0]:.2f} s (uplink "
              f"{staged[1] / 1e6:.1f} MB); "
              + ", ".join(f"{mode} {others[mode][0]:.2f} s (uplink {others[mode][1] / 1e6:.1f} MB), s3/{mode} "
                          f"{seconds / others[mode][0]:.2f}x" for mode in compared))
        rerun, local_rerun = bench.rerun(hosts, s3), bench.rerun(hosts, f"data={local}")
        plain = bench.plain_rerun(hosts, local)
        print(f"            re-run unchanged: s3 {rerun:.2f} s, the same data as a local resource "
              f"{local_rerun:.2f} s, plain rsync {plain:.2f} s; s3 - plain {rerun - plain:+.2f} s, "
              f"s3 - local {rerun - local_rerun:+.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--files", type=int, default=100, help="the files shape: this many files of equal size")
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["one-file", "files"], choices=["one-file", "files"])
    parser.add_argument("--compare", nargs="*", default=["tree", "relay"], choices=["tree", "relay", "direct"],
                        help="the fan-outs of the same data as a local resource to time beside it")
    arguments = parser.parse_args()
    build.check_can_run_lab()
    work = Path(tempfile.mkdtemp(prefix="flambe-bench-s3-", dir="/var/tmp"))
    lab_dir = work / "lab"
    state = build.up(lab_dir, max(arguments.hosts), uplink_mbit=arguments.mbit, host_mbit=arguments.mbit, s3=True)
    environment = {**os.environ, "HOME": str(work / "home"), "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY":
                   "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": state.s3_endpoint}
    try:
        print(f"medians of {arguments.repeats} runs; every link at {arguments.mbit:g} Mbit/s, the S3 stand-in's "
              f"unlimited; this machine has {os.cpu_count()} cores, which the hosts and the stand-in share")
        bench = Bench(lab_dir, state, work, environment, arguments.repeats)
        shapes = {"one-file": (1, "one file"), "files": (arguments.files, f"{arguments.files} files")}
        for shape in arguments.shapes:
            count, words = shapes[shape]
            local = make_files(work / shape, arguments.megabytes, count)
            started = time.perf_counter()
            seeded = subprocess.run(in_client(state, sys.executable, "-c", SEED, str(local), shape), env=environment,
                                    capture_output=True, text=True, cwd="/")
            if seeded.returncode != 0:
                raise SystemExit(f"seeding the stand-in failed: {seeded.stderr[-2000:]}")
            print(f"(seeded in {time.perf_counter() - started:.1f} s)")
            measure_shape(bench, f"{arguments.megabytes} MB as {words}:", shape, local, arguments.hosts,
                          tuple(arguments.compare))
    finally:
        teardown.down(lab_dir)
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
