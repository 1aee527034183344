"""`flambe-deploy status`: per member, reachable, one cluster key, resources intact, the runnable and Ray."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from flambe_iac.agent.commands import Answer, run_quietly
from flambe_iac.agent.records import (
    AGENT_CONFIG,
    AGENT_PID,
    AGENT_STATE,
    MAX_RECORD,
    AgentState,
    parse_clock,
    parse_state,
)
from flambe_iac.cluster import Host
from flambe_iac.day_two.access import Access
from flambe_iac.engine.cluster_key import fingerprint_or_none
from flambe_iac.engine.ray_cluster import RAY_STATE
from flambe_iac.remote_layout import (
    CLUSTER_PUBLIC_KEY,
    MANIFEST,
    RESOURCES_DIR,
    RUN_EXIT,
    RUN_LOG,
    RUN_PID,
    recorded_resources,
)
from flambe_iac.engine.remote_probes import (
    RUNNABLE_RUNNING,
    Section,
    answer_lines,
    checksums_command,
    framed,
    host_sections,
    parse_checksums,
)
from flambe_iac.terminal import safe_field

# The whole answer, hashing every resource file included (a host reads ~1 GB/s), and its size (checksums and the
# manifest, framed: ~140 bytes a file).
STATUS_TIMEOUT = 900.0
STATUS_LIMIT = 256 << 20
STATUS_SCRIPT = f"""\
cd ~ || exit 3
printf '@pub\\n'; {framed(f"cat {CLUSTER_PUBLIC_KEY} 2>/dev/null")}
printf '@manifest\\n'; {framed(f"cat {MANIFEST} 2>/dev/null")}
printf '@sums\\n'
if [ -d {RESOURCES_DIR} ]; then
  {framed(checksums_command(RESOURCES_DIR))}
fi
if [ -f {RUN_PID} ]; then
  printf '@run\\n'
  {framed(f'if {RUNNABLE_RUNNING}; then echo "running $pid"; elif [ -f {RUN_EXIT} ]; '
          f'then echo "exited $(cat {RUN_EXIT})"; else echo gone; fi')}
  printf '@log\\n'; {framed(f"tail -n 5 {RUN_LOG} 2>/dev/null")}
fi
if [ -f {RAY_STATE} ]; then
  printf '@ray\\n'; {framed(f"head -n 1 {RAY_STATE}")}
  for name in gcs_server raylet; do pgrep -u "$(id -u)" -x "$name" >/dev/null 2>&1 && echo "@running $name"; done
fi
if [ -f {AGENT_CONFIG} ]; then
  printf '@agent %s\\n' "$(date +%s)"; {framed(f"head -c {MAX_RECORD + 1} {AGENT_STATE} 2>/dev/null")}
  pid=$(head -c 20 {AGENT_PID} 2>/dev/null)
  case "$pid" in
    ''|*[!0-9]*) ;;
    *) tr '\\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'flambe_iac.agent run' && echo @alive;;
  esac
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
    agent: str | None = None  # the autostop agent in words, or None: none installed here
    agent_record: dict | None = None  # its state record, for --report
    problems: list[str] | None = None
    placement: str | None = None  # where it landed ("p4d.24xlarge us-east-1b spot"), when the source says

    @property
    def healthy(self) -> bool:
        return self.reachable and not self.problems


def parse_status(alias: str, address: str, returncode: int, output: str, stderr: str) -> HostStatus:
    """What the status script printed, read as untrusted: anything malformed is a problem in words, never a crash."""
    sections: dict[str, list[Section]] = {}
    for section in host_sections(answer_lines(output)):  # only a newline ends a line: a name may hold \x85
        sections.setdefault(section.name, []).append(section)
    if returncode != 0 or "@end" not in sections:
        reason = (stderr.strip().splitlines() or [f"ssh exit code {returncode}"])[-1]
        return HostStatus(alias, address, False, problems=[f"unreachable: {reason}"])
    status = HostStatus(alias, address, True, problems=[])

    def body(name: str) -> bytes | None:
        """What the host holds for section NAME, as the script framed it; None where the script printed none."""
        if name not in sections:
            return None
        try:
            return sections[name][0].text()
        except ValueError:
            status.problems.append(f"unreadable answer ({name} is not base64): does a start-up file of the login "
                                   "shell print text?")
            return b""
    public = (body("@pub") or b"").decode(errors="replace")
    status.fingerprint = fingerprint_or_none(" ".join(public.split())) if public.strip() else None
    if status.fingerprint is None:
        status.problems.append("no cluster key")
    recorded = recorded_checksums([(body("@manifest") or b"").decode(errors="surrogateescape")], status.problems)
    found = parse_checksums(body("@sums") or b"")
    if recorded:
        status.resources_match = all(found.get(path) == digest for path, digest in recorded.items())
        if not status.resources_match:
            status.problems.append("resources differ from the manifest's checksums")
    run = body("@run")
    if run is not None:
        status.runnable = runnable_state((answer_lines(run) or [""])[0], status.problems)
        status.log_tail = answer_lines(body("@log") or b"")
    status.ray = ray_status(body("@ray"), {section.argument for section in sections.get("@running", [])},
                            status.problems)
    if "@agent" in sections:
        record = (body("@agent") or b"").decode(errors="surrogateescape").replace("\n", " ")
        status.agent, status.agent_record = agent_status(
            [sections["@agent"][0].argument, record, *(["@alive"] if "@alive" in sections else [])], status.problems)
    return status


def agent_status(lines: list[str], problems: list[str]) -> tuple[str, dict | None]:
    """The agent in words (`watching, idle 12 min (last busy: gpu 80%), stops in 18 min`), from the host's clock,
    its state record and whether its process lives; what cannot be read is a problem in words."""
    now = lines[0].strip() if lines else ""
    record = parse_state(lines[1].encode(errors="surrogateescape") if len(lines) > 1 else b"")
    alive = "@alive" in lines[2:]
    if isinstance(record, str):
        problems.append(f"autostop agent: {record}")
        return ("running" if alive else "NOT RUNNING") + ", state unreadable", None
    words = describe_agent(record, parse_clock(now))
    if not alive and record.state not in ("stopping", "preempted"):
        problems.append("the autostop agent is not running (re-run flambe-deploy --autostop, or reboot)")
        words = f"NOT RUNNING (last: {words})"
    if record.state == "stop refused":
        problems.append(f"autostop could not stop this member: {record.cause}")
    return words, asdict(record)


def describe_agent(record: AgentState, now: float | None) -> str:
    age = f", {now - record.updated_at:.0f} s ago" if now is not None and now >= record.updated_at else ""
    if record.state == "preempted":
        return f"preempted at {utc(record.preempted_at)} ({record.interruption or '?'})"
    if record.state == "stopping":
        return f"stopping (idle {record.idle_minutes:.1f} min{age})"
    busy = f" (last busy: {record.last_busy})" if record.last_busy else ""
    count = len(record.waiting_for)
    waiting = f", waiting for {count} factor{'y' if count == 1 else 'ies'}" if count else ""
    stops = f", stops in {record.stops_in_minutes:.1f} min" if record.stops_in_minutes is not None else ""
    return f"{record.state}, idle {record.idle_minutes:.1f} min{busy}{stops}{waiting}{age}"


def utc(stamp: float | None) -> str:
    return "?" if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def recorded_checksums(lines: list[str], problems: list[str]) -> dict[str, str]:
    """{resource/path: sha256} from the manifest; a missing or unreadable manifest is a problem."""
    text = "\n".join(lines).strip()
    if not text or text == "null":
        problems.append("no manifest: never deployed, or the last deploy failed here")
        return {}
    resources = recorded_resources(text.encode(errors="surrogateescape"))
    if resources is None:
        problems.append("unreadable manifest (~/.flambe/cluster.json): re-run flambe-deploy")
        return {}
    return {f"{name}/{path}": digest for name, files in resources.items() for path, digest in files.items()}


def runnable_state(line: str, problems: list[str]) -> str:
    """"running PID", "exited CODE" or "gone", as the script prints them; anything else is unreadable."""
    words = line.split()
    if words[:1] == ["running"] and len(words) == 2 and words[1].isdigit():
        return f"running (pid {words[1]})"
    if words == ["exited", "0"]:
        return "finished"
    if words[:1] == ["exited"] and len(words) == 2 and words[1].lstrip("-").isdigit():
        state = f"failed (exit {words[1]})"
    elif words == ["gone"]:
        state = "failed (it vanished)"
    else:
        state = "unknown (unreadable run record: an empty ~/.flambe/run.exit is what a full disk leaves)"
    problems.append(f"runnable {state}")
    return state


def ray_status(record: bytes | None, running: set[str], problems: list[str]) -> str | None:
    """What --ray left on a host (RECORD: the first line of its state file, None if none): its role, and whether
    the processes of that role run (RUNNING)."""
    if record is None:
        return None
    try:
        role = json.loads(record).get("role")
    except (ValueError, RecursionError, AttributeError):
        role = None
    role = role if role in ("head", "worker") else "?"
    needed = {"gcs_server", "raylet"} if role == "head" else {"raylet"}
    if needed <= running:
        return f"{role} running"
    problems.append(f"Ray's {role} is not running here (re-run flambe-deploy --ray)")
    return f"{role} STOPPED"


def cluster_status(access: Access) -> list[HostStatus]:
    def probe(member: Host) -> HostStatus:
        status = probed_status(access.alias(member), access.target(member).address,
                               run_quietly(access.ssh_argv(member, STATUS_SCRIPT), STATUS_TIMEOUT, STATUS_LIMIT,
                                           access.policy.environment()))
        status.placement = member.placement or None
        return status

    with ThreadPoolExecutor(max_workers=len(access.cluster.members)) as pool:
        return flag_split_keys(list(pool.map(probe, access.cluster.members)))


def probed_status(alias: str, address: str, answer: Answer | None) -> HostStatus:
    """The member's status from its ANSWER to the status script (None: it did not end within STATUS_TIMEOUT)."""
    if answer is None:
        return HostStatus(alias, address, False, problems=[f"unreachable: no answer within {STATUS_TIMEOUT:.0f} s"])
    if len(answer.stdout) >= STATUS_LIMIT:
        return HostStatus(alias, address, False, problems=[f"unreadable: its answer passed {STATUS_LIMIT >> 20} MiB"])
    return parse_status(alias, address, answer.returncode, answer.stdout, answer.stderr)


def flag_split_keys(statuses: list[HostStatus]) -> list[HostStatus]:
    """Members that hold different cluster keys are each a problem: one cluster, one key."""
    fingerprints = {status.fingerprint for status in statuses if status.fingerprint}
    if len(fingerprints) > 1:
        for status in statuses:
            if status.fingerprint:
                status.problems.append("its cluster key differs from another member's")
    return statuses


def show_status(statuses: list[HostStatus]) -> str:
    lines = []
    for status in statuses:
        state = "ok" if status.healthy else "PROBLEM: " + safe_field("; ".join(status.problems or []))
        key = status.fingerprint or "-"
        resources = {None: "-", True: "match", False: "DIFFER"}[status.resources_match]
        lines.append(safe_field(f"{status.alias:<32} {status.address:<16} key {key[:20]:<20} "
                                f"resources {resources:<6} runnable {status.runnable or '-'} ray {status.ray or '-'}: "
                                f"{state}"))
        if status.placement:
            lines.append(f"    placed: {safe_field(status.placement)}")
        if status.agent:
            lines.append(f"    autostop: {safe_field(status.agent)}")
        for line in status.log_tail or []:
            lines.append(f"    | {safe_field(line)}")
    silent = [f"{status.alias} ({status.address})" for status in statuses if not status.reachable]
    if silent:
        lines.append(safe_field(
            f"not answering, though the source lists them: {', '.join(silent)}. If one is gone for good (a spot "
            "reclaim, a retirement, a termination): `pulumi up --refresh` replaces it, and the next flambe-deploy "
            "brings the new member in and rotates the cluster key the old one held"))
    return "\n".join(lines)
