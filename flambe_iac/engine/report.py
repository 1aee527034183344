"""Outcomes: what a deploy did, host by host and step by step; shown while it runs, and written as JSON.

One table of outcomes decides everything the user and CI see: `ok`, the summary line and the exit code.
Every step asked of a host ends `changed`, `unchanged` or `failed` with a cause in words; `skipped` means only
"not asked of this host". A step still `pending` when the run ends is failed, never read as done.

It holds statuses, durations, addresses and the cluster key's fingerprint; never a secret value.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from flambe_iac.local_files import READABLE, write_atomically
from flambe_iac.terminal import safe_field

CHANGED, UNCHANGED, FAILED, SKIPPED, PENDING = "changed", "unchanged", "failed", "skipped", "pending"
DONE = (CHANGED, UNCHANGED)
WAIT_WORTH_KEEPING = 1.0  # seconds: a wait this long is named in the report, with its length
REMIND_EVERY = 10.0  # seconds: a wait is said again this often in a log (each second in the live table)


@dataclass
class StepResult:
    status: str = SKIPPED
    seconds: float = 0.0
    cause: str | None = None
    detail: str | None = None  # what the step did, where it says more than its status (setup commands' exit codes)


@dataclass
class HostReport:
    host_id: str
    role: str
    address: str
    steps: dict[str, StepResult] = field(default_factory=dict)  # every step of the table, in its order
    connect_seconds: float = 0.0
    error: str | None = None  # the host's first failure, in words
    instance_type: str | None = None  # where it landed, when the source says (checked shapes: see cluster.Host)
    availability_zone: str | None = None
    market: str | None = None
    waits: list[str] = field(default_factory=list)  # each wait of a second or more: what for, and how long

    @property
    def placement(self) -> str:
        return " ".join(filter(None, (self.instance_type, self.availability_zone, self.market)))

    def ask(self, step: str) -> None:
        self.steps[step].status = PENDING

    def finish(self, step: str, status: str, cause: str | None = None) -> None:
        self.steps[step].status = status
        self.steps[step].cause = cause
        if status == FAILED:
            self.error = self.error or f"{step}: {cause}"

    def fail(self, cause: str) -> None:
        """The host cannot go on: every step it was asked and has not finished fails with CAUSE."""
        self.error = self.error or cause
        for result in self.steps.values():
            if result.status == PENDING:
                result.status, result.cause = FAILED, f"not done: {cause}"

    @property
    def ok(self) -> bool:
        return self.error is None and all(step.status in (*DONE, SKIPPED) for step in self.steps.values())


@dataclass
class DeployReport:
    cluster_name: str
    hosts: list[HostReport]
    run_id: str = ""
    cluster_key_fingerprint: str | None = None
    cluster_key_action: str | None = None  # "kept", "created" or "rotated"
    extensions: dict[str, dict] = field(default_factory=dict)  # name -> kind, location, exact git commit
    notes: list[str] = field(default_factory=list)
    departed_members: list[dict] = field(default_factory=list)  # recorded on the hosts, gone from the source
    interrupted: str | None = None  # "SIGINT" or "SIGTERM" when the run was stopped
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.interrupted is None and all(host.ok for host in self.hosts)

    @classmethod
    def for_plan(cls, plan, steps: tuple[str, ...], run_id: str) -> DeployReport:
        """Every member, every step not yet asked."""
        return cls(plan.cluster.name, [HostReport(member.id, member.role, plan.address(member),
                                                  {name: StepResult() for name in steps},
                                                  instance_type=member.instance_type,
                                                  availability_zone=member.availability_zone, market=member.market)
                                       for member in plan.cluster.members], run_id=run_id)

    def settled_cluster_key(self, fingerprint: str, action: str, note: str | None) -> None:
        self.cluster_key_fingerprint, self.cluster_key_action = fingerprint, action
        self.notes.extend([note] if note else [])

    def departed(self, members: list, note: str, holds_key: bool) -> None:
        """Members that left the source (id, private address), whether they still hold the cluster key, and why."""
        self.departed_members = [{"id": member.id, "private_ip": member.private_ip, "holds_cluster_key": holds_key}
                                 for member in members]
        self.notes.append(note)

    def close(self) -> None:
        """End of the run: whatever is still pending was not done."""
        reason = f"the deploy was interrupted ({self.interrupted})" if self.interrupted else "the run ended before it"
        for host in self.hosts:
            if any(result.status == PENDING for result in host.steps.values()):
                host.fail(reason)

    def to_json(self) -> str:
        document = asdict(self)
        document["ok"] = self.ok
        return json.dumps(document, indent=2) + "\n"

    def write(self, path: Path) -> None:
        """Atomically: a reader (CI) never sees half a report."""
        write_atomically(Path(path), self.to_json(), READABLE)


LABELS = {CHANGED: "changed", UNCHANGED: "unchanged", FAILED: "FAILED", SKIPPED: "-", PENDING: "..."}


class ProgressView:
    """Per-host progress: a live table on a terminal, plain lines elsewhere (CI logs)."""

    def __init__(self, report: DeployReport, stream: TextIO = sys.stderr, live: bool | None = None):
        self.report = report
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.drawn_lines = 0
        self.started = time.monotonic()
        self.waiting: dict[str, str] = {}  # host id -> what it waits for now, shown in its row

    @contextmanager
    def waiting_for(self, host: HostReport, what: str):
        """HOST waits for WHAT (`connecting to 10.0.0.3`) while the block runs: named in its row of the live table;
        the report keeps a wait of WAIT_WORTH_KEEPING or more, in the last words `note` gave it, with its length."""
        import gevent  # only a deploy waits: the commands' start-up stays light

        started = time.monotonic()
        self.waiting[host.host_id] = what
        if self.live:
            self.redraw()
        reminder = gevent.spawn(self.remind, host, started)
        try:
            yield
        finally:
            reminder.kill(block=False)
            what = self.waiting.pop(host.host_id, what)
            waited = time.monotonic() - started
            if waited >= WAIT_WORTH_KEEPING:
                host.waits.append(f"{what} ({waited:.1f} s)")
            if self.live:
                self.redraw()

    def connected(self, host: HostReport) -> None:
        if self.live:
            self.redraw()
        elif host.error:
            self.say(f"{host.host_id} ({host.address}): not connected: {host.error}")

    def remind(self, host: HostReport, started: float) -> None:
        """While HOST waits, say so again: a log never sits silent through a long wait, nor the live table's clock."""
        import gevent

        while host.host_id in self.waiting:
            gevent.sleep(1.0 if self.live else REMIND_EVERY)
            if self.live:
                self.redraw()
            elif host.host_id in self.waiting:
                self.say(f"{host.host_id} ({host.address}): {self.waiting[host.host_id]} "
                         f"({time.monotonic() - started:.0f} s so far)")

    def note(self, host: HostReport, text: str) -> None:
        """TEXT about HOST; within a wait, what it now waits for."""
        if host.host_id in self.waiting:
            self.waiting[host.host_id] = text
        if self.live:
            self.redraw()
        else:
            self.say(f"{host.host_id} ({host.address}): {text}")

    def step_done(self, host: HostReport, step: str) -> None:
        if self.live:
            self.redraw()
            return
        result = host.steps[step]
        if result.status == SKIPPED:
            return
        line = f"{host.host_id} ({host.address}): {step} {LABELS[result.status]} ({result.seconds:.2f} s)"
        if result.status == FAILED and result.cause:
            line += f": {result.cause}"
        self.say(line)

    def say(self, line: str) -> None:
        """One line about a host: whatever the host put in it is shown, never acted on by the terminal."""
        print(safe_field(line), file=self.stream, flush=True)

    def columns(self) -> list[str]:
        """The steps some host was asked: a column of dashes helps nobody."""
        names = list(self.report.hosts[0].steps) if self.report.hosts else []
        return [name for name in names
                if any(host.steps[name].status != SKIPPED for host in self.report.hosts)]

    def redraw(self) -> None:
        columns = self.columns()
        placement_width = max((len(host.placement) for host in self.report.hosts), default=0)
        where = f"{'where':<{placement_width}} " if placement_width else ""
        lines = [f"{'host':<24} {'address':<16} {where}" + " ".join(f"{step:<11}" for step in columns)]
        for host in self.report.hosts:
            cells = " ".join(f"{LABELS[host.steps[step].status]:<11}" for step in columns)
            placed = f"{host.placement:<{placement_width}} " if placement_width else ""
            waiting = self.waiting.get(host.host_id)
            lines.append(f"{host.host_id[:24]:<24} {host.address:<16} {placed}{cells}"
                         + (f" {waiting}" if waiting else ""))
        lines.append(f"{time.monotonic() - self.started:.1f} s")
        width = shutil.get_terminal_size((120, 24)).columns
        lines = [safe_field(line)[:width - 1] for line in lines]  # a wrapped line would break the redraw's count
        if self.drawn_lines:
            self.stream.write(f"\x1b[{self.drawn_lines}F\x1b[J")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn_lines = len(lines)


def summary(report: DeployReport) -> str:
    failed = [host for host in report.hosts if not host.ok]
    lines = [f"cluster {report.cluster_name}: {len(report.hosts) - len(failed)} of {len(report.hosts)} hosts done "
             f"in {report.seconds:.2f} s"]
    if report.interrupted:
        lines[0] += f" (INTERRUPTED by {report.interrupted})"
    if report.cluster_key_fingerprint:
        lines.append(f"cluster key {report.cluster_key_fingerprint} ({report.cluster_key_action})")
    lines += [f"note: {safe_field(note)}" for note in report.notes]
    for host in report.hosts:
        changed = [step for step, result in host.steps.items() if result.status == CHANGED]
        if not host.ok:
            state = f"FAILED: {safe_field(host.error or 'see above')}"
        else:
            state = f"changed: {', '.join(changed)}" if changed else "unchanged"
        lines.append(f"  {host.role:<13} {host.host_id:<24} {host.address:<16} {state}")
    return "\n".join(lines)
