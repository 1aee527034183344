"""Ray on the cluster, locked down: what `--ray` starts on each member, and how, without importing Ray here.

The head runs on the orchestrator at its private address, a worker on every factory. Token authentication is on
(RAY_AUTH_MODE=token) with a token made for this cluster alone, in Ray's own default path on every member, 0600.
The dashboard listens on the orchestrator's 127.0.0.1 only. Every port Ray opens between members is fixed, so the
security groups can allow exactly those (`flambe-deploy check --ray`).

The hosts are the state: ~/.flambe/ray.json says how Ray was started on a member (no secret: the token's sha256),
so a re-run with the same members changes nothing, a new factory joins, and a new token restarts everything.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shlex
from dataclasses import dataclass

from flambe_iac.engine.remote_probes import answer_lines, framed, host_sections

RAY_TOKEN = ".ray/auth_token"  # where Ray itself looks (RAY_AUTH_TOKEN_PATH's default)
RAY_STATE = ".flambe/ray.json"
RAY_START_LOG = ".flambe/ray-start.log"
# Ray's sessions, sockets and logs, not in the shared /tmp/ray: Ray makes every directory it creates 0777, so its own
# lies inside one of ours that stays 0700, the SSH user's alone.
RAY_PRIVATE = ".flambe/ray"
RAY_TEMP = f"{RAY_PRIVATE}/tmp"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
# Fixed instead of Ray's random picks, so that a security group can name them.
NODE_PORT_OPTIONS = {
    "--node-manager-port": 6380,
    "--object-manager-port": 6381,
    "--runtime-env-agent-port": 6382,
    "--dashboard-agent-grpc-port": 6383,
    "--metrics-export-port": 6384,
    "--dashboard-agent-listen-port": 52365,
    "--min-worker-port": 10002,
    "--max-worker-port": 19999,
}
# What members must accept from each other (tcp), for `check --ray`.
MEMBER_PORT_RANGES = (
    (GCS_PORT, NODE_PORT_OPTIONS["--metrics-export-port"]),
    (NODE_PORT_OPTIONS["--min-worker-port"], NODE_PORT_OPTIONS["--max-worker-port"]),
    (NODE_PORT_OPTIONS["--dashboard-agent-listen-port"],) * 2,
)
HEAD_PROCESSES = ("gcs_server", "raylet")
WORKER_PROCESSES = ("raylet",)
RAY_CLI = "-m ray.scripts.scripts"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def new_ray_token() -> bytes:
    """As `ray get-auth-token --generate` makes one: 256 random bits, in hex."""
    return secrets.token_hex(32).encode()


def token_sha256(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


@dataclass(frozen=True)
class HeldToken:
    member: object  # whatever names the member to the caller
    is_orchestrator: bool
    sha256: str | None  # of its token file; None if it has none


def token_sources(held: list[HeldToken], rotate: bool) -> list[HeldToken]:
    """Which members' tokens to keep, best first: the orchestrator's (the head's), else the one most members
    hold, ties by digest (never by who answered first). Empty: make a new token (also on rotation)."""
    if rotate:
        return []
    holding = [entry for entry in held if entry.sha256 and entry.sha256 != EMPTY_SHA256]
    counts = {}
    for entry in holding:
        counts[entry.sha256] = counts.get(entry.sha256, 0) + 1
    return sorted(holding, key=lambda entry: (not entry.is_orchestrator, -counts[entry.sha256], entry.sha256))


def desired_state(role: str, python: str, head_address: str, token: bytes, head_started_by: str = "") -> str:
    """The first line of ~/.flambe/ray.json: equal on a re-run means Ray there is already as asked."""
    document = {"role": role, "python": python, "head": f"{head_address}:{GCS_PORT}",
                "token_sha256": token_sha256(token), "ports": NODE_PORT_OPTIONS, "temp_dir": RAY_TEMP}
    if head_started_by:
        document["head_started_by"] = head_started_by  # a restarted head needs its workers restarted
    return json.dumps(document, sort_keys=True)


@dataclass(frozen=True)
class RecordedState:
    desired: str = ""
    started_by: str = ""
    ray_version: str = ""


def parse_state(content: bytes | None) -> RecordedState:
    if not content:
        return RecordedState()
    lines = content.decode(errors="replace").splitlines()
    fields = dict(line.partition(" ")[::2] for line in lines[1:])
    return RecordedState(lines[0] if lines else "", fields.get("started_by", ""), fields.get("ray_version", ""))


# What the host's Python printed for Ray's version (or its error): the host's text, framed.
_VERSION, _VERSION_ERROR = framed('printf %s "$version"'), framed('printf %s "$version" | tail -n 1')


def start_command(python: str, node_address: str, head_address: str, desired: str, run_id: str,
                  expected_version: str = "") -> str:
    """One round trip: check the Python has Ray (and, for a worker, the head's version), stop whatever Ray this user
    runs on this host, start this member's part, and record it. Prints @version, then @started, @no-ray,
    @mismatch or @failed (with the start log's last lines); what the host's Python and Ray print is framed."""
    is_head = not expected_version
    options = [f"--node-ip-address={node_address}", "--disable-usage-stats", "--log-style=record",
               "--log-color=false", *(f"{option}={port}" for option, port in NODE_PORT_OPTIONS.items())]
    if is_head:
        options += ["--head", f"--port={GCS_PORT}", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}"]
    else:
        options.append(f"--address={head_address}:{GCS_PORT}")
    py = shlex.quote(python)
    ray = f"RAY_AUTH_MODE=token {py} {RAY_CLI}"
    version_check = (f'[ "$version" = {shlex.quote(expected_version)} ] || {{ echo @mismatch; exit 0; }}; '
                     if expected_version else "")
    record = shlex.quote(f"{desired}\nstarted_by {run_id}\n")
    return (
        f"version=$({py} -c 'import ray; print(ray.__version__)' 2>&1) "
        f"|| {{ echo @no-ray; {_VERSION_ERROR}; exit 0; }}; "
        f"echo @version; {_VERSION}; {version_check}"
        f"{ray} stop >/dev/null 2>&1; rm -f {RAY_STATE}; mkdir -p .flambe; "
        f"mkdir -p -m 700 {RAY_PRIVATE} && chmod 700 {RAY_PRIVATE} || {{ echo @failed; exit 0; }}; "
        f"if {ray} start {' '.join(shlex.quote(option) for option in options)} "
        f'--temp-dir="$HOME/{RAY_TEMP}" > {RAY_START_LOG} 2>&1 '
        f'&& pgrep -u "$(id -u)" -x raylet >/dev/null; then '
        f"{{ printf '%s' {record}; printf 'ray_version %s\\n' \"$version\"; }} > {RAY_STATE}; echo @started; "
        f"else echo @failed; {framed(f'tail -n 5 {RAY_START_LOG}')}; fi"
    )


def stop_command(python: str) -> str:
    """Stop this user's Ray on this host and forget how it was started. Prints @stopped or @still-running."""
    py = shlex.quote(python)
    return (f"RAY_AUTH_MODE=token {py} {RAY_CLI} stop >/dev/null 2>&1; rm -f {RAY_STATE}; "
            f'if pgrep -u "$(id -u)" -x raylet >/dev/null || pgrep -u "$(id -u)" -x gcs_server >/dev/null; '
            f"then echo @still-running; else echo @stopped; fi")


@dataclass(frozen=True)
class StartOutcome:
    status: str  # "started", "no-ray", "mismatch", "failed"
    version: str = ""
    detail: str = ""


def parse_start_output(output: bytes) -> StartOutcome:
    """What `start_command` printed; anything else, or a start cut short, is a failure (never a success)."""
    found = {section.name: section for section in host_sections(answer_lines(output))}

    def text(name: str) -> str:
        try:
            return found[name].text().decode(errors="replace") if name in found else ""
        except ValueError:  # not framed: not what the command prints
            return ""
    version = text("@version").strip()
    if "@no-ray" in found:
        return StartOutcome("no-ray", detail=text("@no-ray").strip())
    if "@failed" not in found:
        for status in ("mismatch", "started"):
            if f"@{status}" in found:
                return StartOutcome(status, version)
    detail = [line.strip() for line in text("@failed").splitlines() if line.strip()]
    return StartOutcome("failed", version, "; ".join(detail[-3:]))


def runner_environment(head_address: str) -> dict[str, str]:
    """What the runnable gets, so that a plain ray.init() joins the cluster (the token is in Ray's default path)."""
    return {"RAY_ADDRESS": f"{head_address}:{GCS_PORT}", "RAY_AUTH_MODE": "token"}
