"""What a deploy did, host by host and step by step: shown while it runs, and written as JSON.

It holds statuses, durations, addresses and the cluster key's fingerprint; never a secret value.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

CLUSTER_KEY = "cluster key"
SECRETS = "secrets"
RESOURCES = "resources"
EXTENSIONS = "extensions"
INSTALL = "install"
MANIFEST = "manifest"
RUN = "run"
STEPS = (CLUSTER_KEY, SECRETS, RESOURCES, EXTENSIONS, INSTALL, MANIFEST, RUN)

CHANGED, UNCHANGED, FAILED, SKIPPED, PENDING = "changed", "unchanged", "failed", "skipped", "pending"


@dataclass
class StepResult:
    status: str = PENDING
    seconds: float = 0.0


@dataclass
class HostReport:
    host_id: str
    role: str
    address: str
    steps: dict[str, StepResult] = field(default_factory=lambda: {step: StepResult() for step in STEPS})
    connect_seconds: float = 0.0
    error: str | None = None  # why the host failed: a connection refused, a step's error

    @property
    def ok(self) -> bool:
        return self.error is None and all(step.status in (CHANGED, UNCHANGED, SKIPPED)
                                          for step in self.steps.values())


@dataclass
class DeployReport:
    cluster_name: str
    hosts: list[HostReport]
    cluster_key_fingerprint: str | None = None
    cluster_key_action: str | None = None  # "kept", "created" or "rotated"
    extensions: dict[str, dict] = field(default_factory=dict)  # name -> kind, location, exact git commit
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(host.ok for host in self.hosts)

    def to_json(self) -> str:
        document = asdict(self)
        document["ok"] = self.ok
        return json.dumps(document, indent=2) + "\n"

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json())


LABELS = {CHANGED: "changed", UNCHANGED: "unchanged", FAILED: "FAILED", SKIPPED: "-", PENDING: "..."}


class ProgressView:
    """Per-host progress: a live table on a terminal, plain lines elsewhere (CI logs)."""

    def __init__(self, report: DeployReport, stream: TextIO = sys.stderr, live: bool | None = None):
        self.report = report
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.drawn_lines = 0
        self.started = time.monotonic()

    def connected(self, host: HostReport) -> None:
        if self.live:
            self.redraw()
        elif host.error:
            print(f"{host.host_id} ({host.address}): not connected: {host.error}", file=self.stream, flush=True)

    def step_done(self, host: HostReport, step: str) -> None:
        if self.live:
            self.redraw()
            return
        result = host.steps[step]
        if result.status == SKIPPED:
            return
        line = f"{host.host_id} ({host.address}): {step} {LABELS[result.status]} ({result.seconds:.2f} s)"
        if result.status == FAILED and host.error:
            line += f": {host.error}"
        print(line, file=self.stream, flush=True)

    def redraw(self) -> None:
        lines = [f"{'host':<24} {'address':<16} " + " ".join(f"{step:<11}" for step in STEPS)]
        for host in self.report.hosts:
            cells = " ".join(f"{LABELS[host.steps[step].status]:<11}" for step in STEPS)
            lines.append(f"{host.host_id[:24]:<24} {host.address:<16} {cells}")
        lines.append(f"{time.monotonic() - self.started:.1f} s")
        if self.drawn_lines:
            self.stream.write(f"\x1b[{self.drawn_lines}F\x1b[J")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn_lines = len(lines)


def summary(report: DeployReport) -> str:
    failed = [host for host in report.hosts if not host.ok]
    lines = [f"cluster {report.cluster_name}: {len(report.hosts) - len(failed)} of {len(report.hosts)} hosts done "
             f"in {report.seconds:.2f} s"]
    if report.cluster_key_fingerprint:
        lines.append(f"cluster key {report.cluster_key_fingerprint} ({report.cluster_key_action})")
    for host in report.hosts:
        changed = [step for step, result in host.steps.items() if result.status == CHANGED]
        if not host.ok:
            state = f"FAILED: {host.error or 'see above'}"
        else:
            state = f"changed: {', '.join(changed)}" if changed else "unchanged"
        lines.append(f"  {host.role:<13} {host.host_id:<24} {host.address:<16} {state}")
    return "\n".join(lines)
