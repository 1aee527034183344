"""The floor against the deploy, in one run: the bare work a user could script with OpenSSH and rsync alone, and
flambe-deploy doing the same work, on the same lab, in turns, at 1, 16 and 64 hosts. Prints medians and the ratio
deploy / floor pair by pair, and checks them against bench/budget.json.

The work, on every host at once: a cluster key pair and a secrets file, and a resource of 5 MB in 51 files.
The floor is one OpenSSH ControlMaster connection per host, opened under the same policy as every ssh flambe-deploy
starts (only the key, pinned host keys, no agent, no config), one ssh over it that unpacks the key pair and the
secrets and authorizes the public key, one rsync over it, and the master's exit. It checks nothing, locks nothing
and writes no manifest: what flambe-deploy does beyond it is what the ratio costs.

A first run is onto hosts put back as `flambe-lab up` left them; a re-run follows it at once with nothing changed.

Compare every change to the deploy path against this floor, in the same run, not only against the commit before
it: small costs that are each "within the noise" add up (see docs of the budget in bench/budget.json).

With --baseline DIR (a directory holding another flambe_iac package, e.g. an earlier commit's tree from `git archive`
with `flambe_iac/deploys` and `flambe_iac/stacks` linked to its `deploys/` and `stacks/`), that deploy is measured
too, in the same turns, and its ratios to the floor printed beside this one's.

Run as root: .venv/bin/python bench/floor.py [--hosts 1 16 64] [--repeats 3] [--fan-out auto] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from flambe_iac.lab import build, model, teardown
from flambe_iac.ssh.policy import SshTarget, ssh_options

from lab_runs import deploy_command, in_client, reset_hosts, timed

BUDGET = Path(__file__).with_name("budget.json")
RESOURCE_FILES, RESOURCE_BYTES = 50, 5_000_000


def make_work(directory: Path) -> tuple[Path, Path, Path]:
    """The secrets file, the cluster key pair in a staging directory (as the floor sends it), and the resource."""
    staging = directory / "staging"
    staging.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "floor", "-f",
                    str(staging / "ray_bootstrap_key.pem")], check=True)
    os.rename(staging / "ray_bootstrap_key.pem.pub", staging / "ray_bootstrap_key.pub")
    secrets = directory / "secrets.ini"
    secrets.write_text("[aws]\nsecret = floor\n")
    shutil.copy(secrets, staging / "secret.ini")
    resource = directory / "data"
    resource.mkdir()
    for index in range(RESOURCE_FILES):
        (resource / f"part-{index:02}.bin").write_bytes(os.urandom(RESOURCE_BYTES // RESOURCE_FILES))
    (resource / "README.txt").write_bytes(os.urandom(1024))
    return secrets, staging, resource


def floor_script(lab_dir: Path, state: model.LabState, sockets: Path, staging: Path, resource: Path,
                 addresses: list[str]) -> str:
    """One shell line a host, all in the background, then wait: master, the files, rsync, the master's exit."""
    lines = []
    for address in addresses:
        target = SshTarget(address, state.user, lab_dir / model.USER_KEY_FILE, lab_dir / model.KNOWN_HOSTS_FILE)
        options = ssh_options(target)
        control = ["-o", f"ControlPath={sockets}/{address}"]
        login = f"{state.user}@{address}"
        ssh = shlex.join(["ssh", *options, *control])
        unpack = ("umask 077 && mkdir -p .ssh && tar -xf - && "
                  "{ grep -qxF -f ray_bootstrap_key.pub .ssh/authorized_keys || "
                  "cat ray_bootstrap_key.pub >> .ssh/authorized_keys; }")
        steps = [
            shlex.join(["ssh", *options, *control, "-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-f", "-N",
                        login]),
            f"tar -C {shlex.quote(str(staging))} -cf - . | {ssh} {login} {shlex.quote(unpack)}",
            shlex.join(["rsync", "--archive", "--delete", "--rsh", ssh, "--rsync-path", "mkdir -p resources && rsync",
                        f"{resource}/", f"{login}:resources/data/"]),
            shlex.join(["ssh", *control, "-O", "exit", login]) + " 2>/dev/null",
        ]
        lines.append("( " + " && ".join(steps) + " ) &")
    return "\n".join([*lines, "wait"]) + "\n"


def ratio_summary(deploy: list[float], floor: list[float]) -> tuple[float, float, float]:
    """(median deploy, median floor, median of the pairwise ratios)."""
    return statistics.median(deploy), statistics.median(floor), statistics.median(
        [ours / bare for ours, bare in zip(deploy, floor)])


def measure(lab_dir: Path, state: model.LabState, work: Path, hosts: int, repeats: int, fan_out: str,
            inputs: tuple[Path, Path, Path], baseline: Path | None) -> dict:
    secrets, staging, resource = inputs
    sockets = Path(tempfile.mkdtemp(prefix="floor-", dir="/tmp"))  # short: a ControlPath must fit a socket's name
    script = work / f"floor-{hosts}.sh"
    script.write_text(floor_script(lab_dir, state, sockets, staging, resource,
                                   [host.address for host in state.hosts[:hosts]]))
    floor = in_client(state, "sh", str(script))
    deploy = deploy_command(lab_dir, state, work, hosts, "--secrets", str(secrets), "--resource",
                            f"data={resource}", "--fan-out", fan_out)
    runs = {"floor first": [], "floor re-run": [], "deploy first": [], "deploy re-run": [],
            "baseline first": [], "baseline re-run": []}
    old = {**os.environ, "PYTHONPATH": str(baseline)} if baseline else None
    try:
        for _ in range(repeats):
            reset_hosts(lab_dir, state)
            runs["floor first"].append(timed(floor))
            runs["floor re-run"].append(timed(floor))
            reset_hosts(lab_dir, state)
            runs["deploy first"].append(timed(deploy))
            runs["deploy re-run"].append(timed(deploy))
            if old is not None:
                reset_hosts(lab_dir, state)
                runs["baseline first"].append(timed(deploy, old))
                runs["baseline re-run"].append(timed(deploy, old))
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    result = {
        "first": ratio_summary(runs["deploy first"], runs["floor first"]),
        "rerun": ratio_summary(runs["deploy re-run"], runs["floor re-run"]),
    }
    if old is not None:
        result["baseline first"] = ratio_summary(runs["baseline first"], runs["floor first"])
        result["baseline rerun"] = ratio_summary(runs["baseline re-run"], runs["floor re-run"])
    return result


def verdict(ratio: float, goal: float | None) -> str:
    if goal is None:
        return ""
    return f"goal <= {goal:g}x: {'met' if ratio <= goal else 'MISSED'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fan-out", default="auto", choices=("auto", "relay", "tree", "direct"))
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="also measure the flambe_iac package in DIR")
    arguments = parser.parse_args()
    budget = json.loads(BUDGET.read_text())["floor"]
    build.check_can_run_lab()
    work = Path(tempfile.mkdtemp(prefix="flambe-floor-"))
    lab_dir = work / "lab"
    state = build.up(lab_dir, max(arguments.hosts))
    missed = 0
    try:
        inputs = make_work(work)
        print(f"a cluster key, secrets and {RESOURCE_BYTES // 1_000_000} MB in {RESOURCE_FILES + 1} files; "
              f"flambe-deploy --fan-out {arguments.fan_out}; medians of {arguments.repeats}, in turns, one run")
        print("| hosts | floor first / re-run | deploy first / re-run | deploy / floor, first | re-run |")
        print("| --- | --- | --- | --- | --- |")
        for hosts in sorted(arguments.hosts):
            result = measure(lab_dir, state, work, hosts, arguments.repeats, arguments.fan_out, inputs,
                             arguments.baseline)
            goals = budget.get(str(hosts), {})
            (deploy_first, floor_first, first), (deploy_rerun, floor_rerun, rerun) = result["first"], result["rerun"]
            print(f"| {hosts} | {floor_first:.2f} / {floor_rerun:.2f} s | {deploy_first:.2f} / {deploy_rerun:.2f} s "
                  f"| {first:.2f}x {verdict(first, goals.get('first'))} "
                  f"| {rerun:.2f}x {verdict(rerun, goals.get('rerun'))} |", flush=True)
            if arguments.baseline:
                (old_first, _, old_ratio), (old_rerun, _, old_rerun_ratio) = (result["baseline first"],
                                                                              result["baseline rerun"])
                print(f"| {hosts}, baseline | | {old_first:.2f} / {old_rerun:.2f} s | {old_ratio:.2f}x "
                      f"| {old_rerun_ratio:.2f}x |", flush=True)
            missed += sum(ratio > goals[key] for key, ratio in (("first", first), ("rerun", rerun)) if key in goals)
    finally:
        teardown.down(lab_dir)
        shutil.rmtree(work)
    print(f"{missed} goal(s) of bench/budget.json missed" if missed else "every goal of bench/budget.json met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
