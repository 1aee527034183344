"""The agent's loop: sample the signals, keep the state record, stop the member once idle for the set minutes (the
orchestrator only once every factory has stopped or is idle), and answer a spot interruption notice."""

from __future__ import annotations

import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flambe_iac.agent.commands import SHUTDOWN, run_quietly
from flambe_iac.agent.records import (
    AGENT_ENVIRONMENT,
    AGENT_STATE,
    MAX_RECORD,
    AgentConfig,
    AgentState,
    parse_clock,
    parse_state,
)
from flambe_iac.agent.signals import (
    GPU_TIMEOUT,
    PROBE_MARK,
    Thresholds,
    busy_cores,
    busy_signals,
    gpu_reading,
    machine_cpu,
    processes,
)
from flambe_iac.agent.spot import NO_NOTICE, MetadataService, Notice
from flambe_iac.remote_layout import CLUSTER_PRIVATE_KEY, MEMBERS_KNOWN_HOSTS
from flambe_iac.names import HOST_ID
from flambe_iac.local_files import READABLE, write_atomically
from flambe_iac.ssh.policy import SshTarget, ssh_command_line

SPOT_POLL_SECONDS = 5.0  # AWS's advice for the two-minute notice
METADATA_RETRY_SECONDS = 30.0  # a member whose metadata service never answered (not on EC2) is asked this often
STOP_TIMEOUT = 60
PROBE_TIMEOUT = 20
NOTICE_TIMEOUT = 100  # the runner gives on_preempt at most 90 s; then Ray stops, within the notice's two minutes
SILENT_SECONDS = 120  # a factory that answers no probe for this long has stopped (one lost probe is not a stop)
MAX_ANSWER = MAX_RECORD + 64
MAX_VERDICT = 120


def sample_seconds(minutes: float) -> float:
    """Each minute; more often for windows under six minutes, so a short window is still watched six times."""
    return max(1.0, min(60.0, minutes * 60 / 6))


class Watch:
    """CLOCK (monotonic) measures the windows, so a stepped wall clock never stops a busy member; WALL only stamps
    the record."""

    def __init__(self, home: Path, config: AgentConfig, clock=time.monotonic, metadata: MetadataService | None = None,
                 wall=time.time):
        self.home, self.config, self.clock, self.wall = home, config, clock, wall
        self.metadata = metadata or MetadataService()
        self.state = AgentState(pid=os.getpid(), role=config.role, minutes=config.minutes, last_busy_at=None,
                                updated_at=wall())
        self.quiet_since = clock()  # a fresh agent waits the whole window: its start is the last sign of work
        self.members = Members(home, config, clock)
        self.cpu = machine_cpu()
        self.cores = os.cpu_count() or 1
        self.interval = sample_seconds(config.minutes)
        self.next_sample = self.next_metadata_try = clock()
        self.notice_answered = False  # until the service says there is none: EC2 serves it until it interrupts

    @property
    def state_path(self) -> Path:
        return self.home / AGENT_STATE

    def sample(self) -> list[str]:
        """The busy signals now; CPU over the time since the last sample."""
        cpu = machine_cpu()
        cores = busy_cores(self.cpu, cpu, self.cores)
        self.cpu = cpu
        return busy_signals(Thresholds(self.config.gpu_percent, self.config.cpu_cores), self.config.user, self.home,
                            cores, gpu_reading(min(GPU_TIMEOUT, self.interval)), processes())

    def observe(self, signals: list[str]) -> bool:
        """Update the record with SIGNALS; True once the member has been idle for the set minutes."""
        now = self.clock()
        if signals:
            self.quiet_since = now
            self.state.last_busy, self.state.last_busy_at = ", ".join(signals)[:MAX_VERDICT], self.wall()
        # Unrounded: the orchestrator compares these with the window, exactly as this agent does.
        self.state.idle_minutes = (now - self.quiet_since) / 60
        self.state.stops_in_minutes = max(0.0, self.config.minutes - self.state.idle_minutes)
        return self.state.idle_minutes >= self.config.minutes

    def step(self) -> None:
        """One sample and what follows from it; after a stop or a notice, the record only keeps its time."""
        if self.state.state not in ("stopping", "preempted"):
            idle = self.observe(self.sample())
            busy_factories = self.members.busy_factories() if idle and self.config.factories else []
            self.state.waiting_for = busy_factories[:8] + ([f"and {len(busy_factories) - 8} more"]
                                                            if len(busy_factories) > 8 else [])
            if idle and not busy_factories:
                self.stop()
            else:
                self.state.state = "waiting for factories" if busy_factories else "watching"
        self.state.updated_at = self.wall()
        self.save()

    def stop(self) -> None:
        """The instance's own shutdown, which the stack maps to stop or terminate (its idleAction)."""
        result = run_quietly(SHUTDOWN, STOP_TIMEOUT)
        if result is None or result.returncode != 0:
            said = (result.stderr.strip().splitlines()[-1:] if result is not None else ["no answer"]) or ["refused"]
            self.state.state, self.state.cause = "stop refused", f"sudo -n shutdown: {said[0][:200]}"
        else:
            self.state.state, self.state.cause = "stopping", None

    def check_notice(self) -> None:
        """A notice is answered once: EC2 serves the same one at every question until the interruption, and one
        whose bytes change (its time) is still that interruption. When the service says there is none again (back
        from hibernation), the member is watched afresh, and a later notice is a second interruption, answered too."""
        notice = self.metadata.interruption()
        if notice == NO_NOTICE:
            if self.state.state == "preempted":
                self.state.state, self.state.cause, self.quiet_since = "watching", None, self.clock()
            self.notice_answered = False
        elif isinstance(notice, Notice) and not self.notice_answered:
            self.notice_answered = True
            self.preempt(notice)

    def preempt(self, notice: Notice) -> None:
        """Whatever the notice says, the runnable hears of it and Ray stops: the member is going."""
        self.state.state, self.state.preempted_at, self.state.interruption = "preempted", self.wall(), notice.words
        self.state.cause = notice.cause
        self.save()
        untold = self.members.tell_the_runnable(notice.words)
        if untold:
            self.state.cause = "; ".join(filter(None, (notice.cause, untold)))
            self.save()
        if self.config.ray_stop:
            run_quietly(("sh", "-c", f"cd && {self.config.ray_stop}"), STOP_TIMEOUT)

    def save(self) -> None:
        try:
            write_atomically(self.state_path, self.state.to_bytes(), READABLE)
        except OSError as error:  # a full disk: the decisions go on; the record is written again next time
            log(f"cannot write {AGENT_STATE}: {error.strerror}")

    def run(self) -> None:
        """Forever: a failure in one round is logged and the next round comes, since an agent that ended would
        leave the member running until the next boot."""
        while True:
            time.sleep(self.round())

    def round(self) -> float:
        """A sample when one is due, and the notice asked for (on EC2 at least every SPOT_POLL_SECONDS); the seconds
        until the next round."""
        now = self.clock()
        if now >= self.next_sample:
            guarded(self.step)
            self.next_sample = now + self.interval
        if self.metadata.answered or now >= self.next_metadata_try:
            guarded(self.check_notice)
            self.next_metadata_try = now + METADATA_RETRY_SECONDS
        return max(0.2, min(self.next_sample - self.clock(), SPOT_POLL_SECONDS))


SSH_REFUSALS = ("Permission denied", "Host key verification failed")  # ssh's words when a live sshd says no


def refusal(stderr: str) -> str | None:
    """What ssh said, if a member's sshd answered and refused (not the silence of a member that has stopped)."""
    return next((words for words in SSH_REFUSALS if words in stderr), None)


class Members:
    """The other members, as this one's agent sees them over the cluster key: the factories' state records (for the
    orchestrator), and the hop to the orchestrator (for a notice)."""

    def __init__(self, home: Path, config: AgentConfig, clock):
        self.home, self.config, self.clock = home, config, clock
        self.silent_since: dict[str, float] = {}  # factory address -> when it first answered no probe

    def busy_factories(self) -> list[str]:
        """The factories that still work, each as ADDRESS: WHY. One that does not answer has stopped."""
        with ThreadPoolExecutor(max_workers=min(16, len(self.config.factories))) as pool:
            verdicts = list(pool.map(self.verdict, self.config.factories))
        return [f"{address}: {verdict}"[:MAX_VERDICT]
                for address, verdict in zip(self.config.factories, verdicts) if verdict]

    def verdict(self, address: str) -> str | None:
        """None if the factory at ADDRESS has stopped, is stopping, was preempted or is idle; else why it may work.
        One that answers no probe for SILENT_SECONDS has stopped; its state record, with the time on its own clock,
        must be fresh (an agent that died there is no word that it is idle)."""
        answer = run_quietly(self.hop(address, f"date +%s; head -c {MAX_RECORD + 1} {AGENT_STATE}"),
                             PROBE_TIMEOUT, MAX_ANSWER)
        refused = answer is not None and answer.returncode == 255 and refusal(answer.stderr)
        if refused:  # its sshd answered: the member is up, whatever it does
            self.silent_since.pop(address, None)
            return f"it is up but refuses the cluster's SSH ({refused})"
        if answer is None or answer.returncode == 255:
            silent = self.clock() - self.silent_since.setdefault(address, self.clock())
            return None if silent >= SILENT_SECONDS else f"no answer for {silent:.0f} s"
        self.silent_since.pop(address, None)
        clock_line, _, text = answer.stdout.partition("\n")
        record = parse_state(text.encode(errors="replace")) if answer.returncode == 0 else "no agent state there"
        if isinstance(record, str):
            return record
        if record.state in ("stopping", "preempted"):
            return None
        if record.state == "stop refused":  # idle, but still running: the orchestrator must not leave it alone
            return f"its stop was refused ({record.cause or 'no cause given'})"
        clock = parse_clock(clock_line)
        if clock is None or clock - record.updated_at > 3 * sample_seconds(record.minutes) + 60:
            return "its agent has not written its state lately"
        if record.idle_minutes >= record.minutes:
            return None
        return f"busy ({record.last_busy or 'its window has not passed'})"

    def tell_the_runnable(self, words: str) -> str | None:
        """On the orchestrator, the runner calls the runnable's on_preempt (at most 90 s); this waits for it. None,
        or why the runnable could not be told."""
        if not HOST_ID.fullmatch(self.config.member_id):
            return f"this member's id {self.config.member_id[:40]!r} is no host id: on_preempt not told"
        command = (f"cd && {AGENT_ENVIRONMENT} python3 -m flambe_iac.agent notice "
                   f"{shlex.quote(self.config.member_id)} {shlex.quote(words)}")
        orchestrator = self.config.orchestrator
        argv = ["sh", "-c", command] if orchestrator is None else self.hop(orchestrator, command)
        answer = run_quietly(argv, NOTICE_TIMEOUT)
        if answer is None:
            return f"the orchestrator did not answer within {NOTICE_TIMEOUT} s: on_preempt not told"
        if answer.returncode != 0:
            said = answer.stderr.strip().splitlines()[-1:] or [f"exit {answer.returncode}"]
            return f"the notice to the orchestrator failed ({said[0][:200]}): on_preempt not told"
        return None

    def hop(self, address: str, command: str) -> list[str]:
        """ssh to another member under the members' policy (the cluster key, pinned host keys), marked as a probe
        so that the member's agent does not count it as a session (the last `:` keeps the marked shell there)."""
        target = SshTarget(address=address, user=self.config.user, key=self.home / CLUSTER_PRIVATE_KEY,
                           known_hosts=self.home / MEMBERS_KNOWN_HOSTS, connect_timeout=5)
        return ssh_command_line(target, f": {PROBE_MARK}; {command}; :")


def guarded(action) -> None:
    try:
        action()
    except Exception as error:  # any failure of one round: logged, and the agent keeps watching
        log(f"{action.__name__} failed: {type(error).__name__}: {error}")


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} autostop: {message}", flush=True)

