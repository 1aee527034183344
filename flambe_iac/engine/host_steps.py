"""One member's share of a run: its state read once, then its asked steps in order, each step's operations run
and their outcome (changed, unchanged, failed with a cause in words) recorded in the report."""

from __future__ import annotations

import time

import gevent
from pyinfra.api.operations import run_host_op
from pyinfra.context import ctx_host, ctx_state

from flambe_iac.engine.snapshot import SnapshotError, read_snapshot, snapshot_after_lock
from flambe_iac.engine.steps import StepContext, asked_steps
from flambe_iac.engine.fleet import Fleet
from flambe_iac.engine.report import CHANGED, FAILED, UNCHANGED
from flambe_iac.errors import describe_exception
from flambe_iac.ssh.channel import ANSWER_TIMEOUT, RemoteCommandError, connection_alive, run_remote

CLEANUP_TIMEOUT = 10.0


class HostSteps:
    """Reads each member's state and runs its steps. READ and RUN_OPERATION reach the hosts: pyinfra's by default,
    stand-ins in tests."""

    def __init__(self, fleet: Fleet, context: StepContext, view, lock_lost=lambda: None, read=read_snapshot,
                 run_operation=run_host_op, alive=connection_alive):
        self.fleet = fleet
        self.context = context
        self.view = view
        self.lock_lost = lock_lost  # why this run may write no more (the deploy lock is gone), or None
        self.read = read
        self.run_operation = run_operation
        self.alive = alive  # a host whose connection dropped gets nothing more: its lock went with it

    def read_state(self, host, request):
        """The host's snapshot, or None (the host failed) if it cannot be read or lacks a tool an asked step needs."""
        entry = self.fleet.entries[host]
        try:
            with self.view.waiting_for(entry, f"reading the state of {entry.address}"):
                snapshot = self.read(host, request, ANSWER_TIMEOUT)
        except SnapshotError as error:
            entry.fail(str(error))
            return None
        needed = {tool for step in asked_steps(self.context, self.fleet.members[host])
                  for tool in step.reads(self.context).tools}
        missing = sorted(snapshot.missing_tools & needed)
        if missing:
            entry.fail(f"{', '.join(missing)} not installed on the host: install {' and '.join(missing)}")
            return None
        return snapshot

    def run_steps(self, host, snapshot) -> None:
        try:
            self.run_asked_steps(host, snapshot)
        finally:
            self.context.member_finished(self.fleet.members[host], self.fleet.entries[host].error)

    def run_asked_steps(self, host, snapshot) -> None:
        member, entry = self.fleet.members[host], self.fleet.entries[host]
        for step in asked_steps(self.context, member):
            started = time.monotonic()
            with ctx_state.use(self.fleet.state), ctx_host.use(host):
                metas = step.deploy(self.context, member, snapshot)
            status, cause = self.run_operations(host, metas)
            entry.steps[step.name].seconds = time.monotonic() - started
            entry.steps[step.name].detail = self.context.details.pop(host.name, None)
            entry.finish(step.name, status, cause)
            self.view.step_done(entry, step.name)
            if status == FAILED:
                entry.fail(f"{step.name} failed")
                return

    def run_operations(self, host, metas: list) -> tuple[str, str | None]:
        self.context.causes.pop(host.name, None)
        changed = False
        for meta in metas:
            lost = self.lock_lost()
            if lost:
                return FAILED, lost
            if not self.alive(host):
                return FAILED, "the connection to the host dropped (and its deploy lock with it): nothing more sent"
            try:
                with ctx_state.use(self.fleet.state), ctx_host.use(host):
                    succeeded = self.run_operation(self.fleet.state, host, meta._hash)
            except Exception as error:  # a fact, a command generator, the connection: this host fails, with why
                return FAILED, self.context.causes.pop(host.name, None) or describe_exception(error)
            if not succeeded:
                return FAILED, self.failure_cause(host, meta)
            changed = changed or meta.did_change()
        return (CHANGED if changed else UNCHANGED), None

    def failure_cause(self, host, meta) -> str:
        recorded = self.context.causes.pop(host.name, None)
        if recorded:
            return recorded
        stderr = " ".join(meta.stderr_lines[-3:]).strip() if meta.is_complete() else ""
        if stderr:
            return stderr
        if not self.alive(host):
            return "the connection to the host dropped"
        return "the command failed without saying why (run with -v to see pyinfra's log)"


def read_after_lock(lock):
    """A READ for HostSteps: each member's state from its deploy lock's session, where the read ran once the lock was
    held (ClusterLock.take_all's THEN); a member without flock (no lock held) is read in a session of its own."""
    def read(host, request, timeout: float):
        held = lock.held.get(host)
        return snapshot_after_lock(held, timeout) if held is not None else read_snapshot(host, request, timeout)
    return read


def remove_staging(hosts: list, staging: str) -> None:
    """After an interrupt: this run's staging directory off every host it reached (each upload removes its own when
    it ends normally)."""
    def clean(host):
        try:
            run_remote(host, f"rm -rf {staging}", timeout=CLEANUP_TIMEOUT)
        except RemoteCommandError:
            pass  # the host is gone; the next run's staging is a new directory anyway

    gevent.joinall([gevent.spawn(clean, host) for host in hosts], timeout=CLEANUP_TIMEOUT)
