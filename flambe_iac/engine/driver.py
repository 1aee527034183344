"""Runs a DeployPlan: the order of the phases, and nothing else. Each phase runs on all hosts at once.

connect (waiting for sshd) -> take the deploy lock on every member at once -> read each host's snapshot -> settle the
cluster key and Ray's token -> run each host's asked steps -> release the lock, clean up. The caller patched gevent."""

from __future__ import annotations

import secrets
import signal
import time

import gevent

from flambe_iac.engine.connecting import connect_with_wait
from flambe_iac.engine.fan_out import prepare_fan_out
from flambe_iac.engine.fleet import Fleet
from flambe_iac.engine.host_steps import HostSteps, read_after_lock, remove_staging
from flambe_iac.engine.lock import ClusterLock, open_deploy_lock
from flambe_iac.engine.report import DeployReport, ProgressView
from flambe_iac.engine.settlement import settle
from flambe_iac.engine.snapshot import snapshot_command
from flambe_iac.engine.steps import StepContext, asked_steps, snapshot_request
from flambe_iac.errors import describe_exception
from flambe_iac.ssh.processes import stop_children

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def run_deploy(plan, stream, table, live=None, connect=connect_with_wait, open_lock=open_deploy_lock, **host_steps):
    """TABLE: the StepTable to run. CONNECT, OPEN_LOCK and HOST_STEPS (read, run_operation) reach the hosts: tests pass
    stand-ins."""
    started = time.monotonic()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"  # names this run's staging: never shared
    report = DeployReport.for_plan(plan, table.names, run_id)
    deployment = Deployment(plan, table, report, ProgressView(report, stream, live), connect, open_lock, host_steps)
    interrupt = deployment.fleet.interrupt
    handlers = [gevent.signal_handler(signum, interrupt, name) for signum, name in SIGNAL_NAMES.items()]
    try:
        deployment.run()
    except Exception as error:  # a fault of ours, not of a host: still an honest report, never a traceback
        report.notes.append(f"flambe-deploy stopped early on an internal error: {describe_exception(error)}")
    finally:
        for handler in handlers:
            handler.cancel()
        deployment.close()
        report.close()
        report.seconds = time.monotonic() - started
    return report


class Deployment:
    """One run: its fleet of hosts, what the steps share, and the deploy lock."""

    def __init__(self, plan, table, report: DeployReport, view: ProgressView, connect, open_lock, host_steps: dict):
        self.plan, self.report, self.view, self.connect = plan, report, view, connect
        self.fleet = Fleet(plan, report)
        self.lock = ClusterLock(self.fleet, plan.wait, view, open_lock)
        self.context = StepContext(plan, self.fleet.policy, report.run_id, table, writes_stopped=self.lock.lost)
        self.watchdog = None
        self.read_with_lock = "read" not in host_steps  # tests read through stand-ins of their own
        self.steps = HostSteps(self.fleet, self.context, view, lock_lost=self.lock.lost,
                               **{"read": read_after_lock(self.lock), **host_steps})
        for host, member in self.fleet.members.items():
            for step in asked_steps(self.context, member):
                self.fleet.entries[host].ask(step.name)

    def run(self) -> None:
        fleet = self.fleet
        connected = [host for host, ok in zip(fleet.hosts, fleet.each_host(self.connect_host, fleet.hosts)) if ok]
        request = snapshot_request(self.context)
        then = snapshot_command(request) if self.read_with_lock else ""  # the read in the lock's round trip
        if not connected or not self.lock.take_all(connected, then=then):  # all or nothing, once all are connected
            return
        connected = [host for host in connected if self.fleet.entries[host].error is None]  # not locked: nothing
        prepare_fan_out(self.context, fleet, self.view, connected)
        self.watchdog = gevent.spawn(self.lock.watch, stop_children)
        read = fleet.each_host(lambda host: self.steps.read_state(host, request), connected)
        snapshots = {host: snapshot for host, snapshot in zip(connected, read) if snapshot is not None}
        if not snapshots or self.report.interrupted:
            return
        settle(self.context, self.report, fleet, snapshots)
        try:
            fleet.each_host(lambda host: self.steps.run_steps(host, snapshots[host]), list(snapshots))
        finally:
            self.report.notes.extend(dict.fromkeys(self.context.notes))

    def connect_host(self, host) -> bool:
        connected = self.connect(host, self.fleet.entries[host], self.plan.wait, self.fleet.policy, self.view)
        if connected:
            self.fleet.state.activate_host(host)
        self.view.connected(self.fleet.entries[host])
        return connected

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.kill()
        self.lock.release()
        if self.report.interrupted:
            remove_staging([host for host in self.fleet.hosts if host.connected], self.context.staging)
        self.fleet.disconnect()
