"""Relay fan-out against direct transfers, behind a limited uplink: first runs of flambe-deploy with
--fan-out direct and --fan-out relay, a plain parallel rsync to every host, and the uplink-once limit (one rsync of
the resource to one host), all measured in this one run. Prints medians and ratios.

Run as root: .venv/bin/python bench/relay.py [--hosts 4 8 16 32] [--megabytes 20] [--uplink-mbit 100] [--repeats 3]
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

from lab_runs import clear_resources, in_client, plain_parallel_rsync, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[8])
    parser.add_argument("--megabytes", type=int, default=20)
    parser.add_argument("--uplink-mbit", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    build.check_can_run_lab()
    work = Path(tempfile.mkdtemp(prefix="flambe-bench-relay-"))
    lab_dir = work / "lab"
    state = build.up(lab_dir, max(arguments.hosts), uplink_mbit=arguments.uplink_mbit)
    try:
        resource = work / "data"
        resource.mkdir()
        for index in range(4):
            (resource / f"part-{index}.bin").write_bytes(os.urandom(arguments.megabytes * 1_000_000 // 4))
        outputs = json.loads((lab_dir / model.OUTPUTS_FILE).read_text())
        limit = arguments.megabytes * 8 / arguments.uplink_mbit
        print(f"{arguments.megabytes} MB resource, uplink {arguments.uplink_mbit:g} Mbit/s both ways "
              f"(crossing it once takes {limit:.2f} s at the least); medians of {arguments.repeats} first runs:")
        once = statistics.median(
            [clear_resources(lab_dir, state) or timed(plain_parallel_rsync(lab_dir, state, [state.hosts[0].address],
                                                                             resource))
             for _ in range(arguments.repeats)])
        print(f"  uplink once (rsync to one host): {once:.2f} s")
        for size in sorted(arguments.hosts):
            trimmed = work / f"outputs-{size}.json"
            trimmed.write_text(json.dumps({**outputs, "factories": outputs["factories"][: size - 1]}))
            deploy = in_client(state, sys.executable, "-m", "flambe_iac.cli.deploy", "--outputs", str(trimmed),
                               "--key", str(lab_dir / model.USER_KEY_FILE), "--known-hosts",
                               str(lab_dir / model.KNOWN_HOSTS_FILE), "--resource", f"data={resource}")
            plain = plain_parallel_rsync(lab_dir, state, [host.address for host in state.hosts[:size]], resource)
            times: dict[str, list[float]] = {"plain": [], "direct": [], "relay": []}
            for _ in range(arguments.repeats):
                for mode, argv in (("plain", plain), ("direct", [*deploy, "--fan-out", "direct"]),
                                   ("relay", [*deploy, "--fan-out", "relay"])):
                    clear_resources(lab_dir, state)
                    times[mode].append(timed(argv))
            plain_s, direct_s, relay_s = (statistics.median(times[mode]) for mode in ("plain", "direct", "relay"))
            print(f"  {size:>2} hosts: plain parallel rsync {plain_s:.2f} s, direct {direct_s:.2f} s, relay "
                  f"{relay_s:.2f} s; relay/plain {relay_s / plain_s:.2f}x, relay/direct {relay_s / direct_s:.2f}x, "
                  f"relay/uplink-once {relay_s / once:.2f}x")
    finally:
        teardown.down(lab_dir)
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
