"""`flambe-deploy status`: per member, reachable, one cluster key, resources intact, the runnable and Ray."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from flambe_iac.cluster import Host
from flambe_iac.day_two.access import Access
from flambe_iac.engine.cluster_key import fingerprint_or_none
from flambe_iac.engine.ray_cluster import RAY_STATE
from flambe_iac.engine.remote_layout import CLUSTER_PUBLIC_KEY, MANIFEST, RESOURCES_DIR, RUN_EXIT, RUN_LOG, RUN_PID
from flambe_iac.engine.remote_probes import RUNNABLE_RUNNING, checksums_command, parse_checksums

STATUS_SCRIPT = f"""\
cd ~ || exit 3
printf '@pub\\n'; cat {CLUSTER_PUBLIC_KEY} 2>/dev/null
printf '@manifest\\n'; cat {MANIFEST} 2>/dev/null
printf '@sums\\n'
if [ -d {RESOURCES_DIR} ]; then
  ({checksums_command(RESOURCES_DIR)})
fi
printf '@run\\n'
if [ -f {RUN_PID} ]; then
  if {RUNNABLE_RUNNING}; then
    echo "running $pid"
  elif [ -f {RUN_EXIT} ]; then echo "exited $(cat {RUN_EXIT})"; else echo "gone"; fi
  printf '@log\\n'; tail -n 5 {RUN_LOG} 2>/dev/null
fi
printf '@ray\\n'
if [ -f {RAY_STATE} ]; then
  head -n 1 {RAY_STATE}
  for name in gcs_server raylet; do pgrep -u "$(id -u)" -x "$name" >/dev/null 2>&1 && echo "@running $name"; done
fi
printf '@end\\n'
"""


@dataclass
class HostStatus:
    alias: str
    address: str
    reachable: bool
    fingerprint: str | None = None
    resources_match: bool | None = None  # None: no resources recorded
    runnable: str | None = None  # "running (pid N)", "finished", "failed (exit N)", or None: never started
    ray: str | None = None  # "head running", "worker running", or None: Ray not started here by --ray
    log_tail: list[str] | None = None
    problems: list[str] | None = None

    @property
    def healthy(self) -> bool:
        return self.reachable and not self.problems


def parse_status(alias: str, address: str, returncode: int, output: str, stderr: str) -> HostStatus:
    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("@") and line[1:] in ("pub", "manifest", "sums", "run", "log", "ray", "end"):
            current = line[1:]
            sections[current] = []
        elif current:
            sections[current].append(line)
    if returncode != 0 or "end" not in sections:
        reason = (stderr.strip().splitlines() or [f"ssh exit code {returncode}"])[-1]
        return HostStatus(alias, address, False, problems=[f"unreachable: {reason}"])
    status = HostStatus(alias, address, True, problems=[])
    status.fingerprint = fingerprint_or_none(" ".join(sections.get("pub", []))) if sections.get("pub") else None
    if status.fingerprint is None:
        status.problems.append("no cluster key")
    try:
        manifest = json.loads("\n".join(sections.get("manifest", [])) or "null")
    except json.JSONDecodeError:
        manifest = None
    if manifest is None:
        status.problems.append("no manifest: never deployed, or the last deploy failed here")
    recorded = {f"{name}/{path}": digest for name, files in ((manifest or {}).get("resources") or {}).items()
                for path, digest in files.items()}
    found = parse_checksums(sections.get("sums", []))
    if recorded:
        status.resources_match = all(found.get(path) == digest for path, digest in recorded.items())
        if not status.resources_match:
            status.problems.append("resources differ from the manifest's checksums")
    run = (sections.get("run") or [""])[0].split()
    if run:
        if run[0] == "running":
            status.runnable = f"running (pid {run[1]})"
        elif run[0] == "exited" and run[1:] == ["0"]:
            status.runnable = "finished"
        else:
            status.runnable = f"failed (exit {run[1]})" if run[0] == "exited" else "failed (it vanished)"
            status.problems.append(f"runnable {status.runnable}")
        status.log_tail = sections.get("log", [])
    status.ray = ray_status(sections.get("ray", []), status.problems)
    return status


def ray_status(lines: list[str], problems: list[str]) -> str | None:
    """What --ray left on a host: its role, and whether the processes of that role run."""
    if not lines:
        return None
    try:
        role = json.loads(lines[0]).get("role", "?")
    except (json.JSONDecodeError, AttributeError):
        role = "?"
    running = {line.split()[1] for line in lines[1:] if line.startswith("@running ")}
    needed = {"gcs_server", "raylet"} if role == "head" else {"raylet"}
    if needed <= running:
        return f"{role} running"
    problems.append(f"Ray's {role} is not running here (re-run flambe-deploy --ray)")
    return f"{role} STOPPED"


def cluster_status(access: Access) -> list[HostStatus]:
    def probe(member: Host) -> HostStatus:
        result = subprocess.run(access.ssh_argv(member, STATUS_SCRIPT), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, env=access.policy.environment())
        return parse_status(access.alias(member), access.target(member).address, result.returncode, result.stdout,
                            result.stderr)

    with ThreadPoolExecutor(max_workers=len(access.cluster.members)) as pool:
        statuses = list(pool.map(probe, access.cluster.members))
    fingerprints = {status.fingerprint for status in statuses if status.fingerprint}
    if len(fingerprints) > 1:
        for status in statuses:
            if status.fingerprint:
                status.problems.append("its cluster key differs from another member's")
    return statuses


def show_status(statuses: list[HostStatus]) -> str:
    lines = []
    for status in statuses:
        state = "ok" if status.healthy else "PROBLEM: " + "; ".join(status.problems or [])
        key = status.fingerprint or "-"
        resources = {None: "-", True: "match", False: "DIFFER"}[status.resources_match]
        lines.append(f"{status.alias:<32} {status.address:<16} key {key[:20]:<20} resources {resources:<6} "
                     f"runnable {status.runnable or '-'} ray {status.ray or '-'}: {state}")
        for line in status.log_tail or []:
            lines.append(f"    | {line}")
    return "\n".join(lines)
