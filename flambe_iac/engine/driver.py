"""Runs a DeployPlan: the order of the phases, and nothing else.

connect every host (waiting for sshd; the orchestrator takes the deploy lock at once) -> read each host's snapshot
-> settle the cluster key (and Ray's token) -> run every host's asked steps -> release the lock, clean up.
Each phase runs on all hosts at once (`Fleet.each_host`): whatever happens on one host fails that host with its
cause and never stops the others; the report's table of outcomes is the only source of `ok`.
The caller must have patched the standard library with gevent (`flambe_iac.cli.deploy` does, first thing).
"""

from __future__ import annotations

import secrets
import signal
import time
from typing import TextIO

import gevent

from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.deploys.operations import stop_children
from flambe_iac.deploys.steps import STEP_NAMES, StepContext, asked_steps, extension_sources, snapshot_request
from flambe_iac.engine.cluster_key import settle_cluster_key
from flambe_iac.engine.connecting import connect_with_wait
from flambe_iac.engine.fleet import Fleet, describe_exception
from flambe_iac.engine.host_steps import HostSteps, remove_staging
from flambe_iac.engine.lock import open_deploy_lock, take_deploy_lock
from flambe_iac.engine.ray_cluster import RAY_TOKEN
from flambe_iac.engine.ray_settlement import settle_ray
from flambe_iac.engine.remote_layout import CLUSTER_PRIVATE_KEY
from flambe_iac.engine.report import DeployReport, ProgressView
from flambe_iac.inputs.plan import DeployPlan
from flambe_iac.ssh.channel import read_file

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(gevent.GreenletExit):
    """Thrown into the phase's greenlets on SIGINT or SIGTERM: a BaseException, so no host's handler takes it,
    and a GreenletExit, so the greenlet ends quietly."""


def run_deploy(plan: DeployPlan, stream: TextIO, live: bool | None = None, connect=connect_with_wait,
               open_lock=open_deploy_lock, **host_steps) -> DeployReport:
    """CONNECT, OPEN_LOCK and HOST_STEPS (read, run_operation) reach the hosts; tests pass stand-ins."""
    started = time.monotonic()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"  # names this run's staging: never shared
    report = DeployReport.for_plan(plan, STEP_NAMES, run_id)
    deployment = Deployment(plan, report, ProgressView(report, stream, live), connect, open_lock, host_steps)
    handlers = [gevent.signal_handler(signum, deployment.interrupt, signum) for signum in SIGNAL_NAMES]
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
    def __init__(self, plan: DeployPlan, report: DeployReport, view: ProgressView, connect, open_lock, host_steps):
        self.plan, self.report, self.view, self.connect, self.open_lock = plan, report, view, connect, open_lock
        self.fleet = Fleet(plan, report)
        self.context = StepContext(plan, self.fleet.policy, report.run_id)
        self.steps = HostSteps(self.fleet, self.context, view, **host_steps)
        self.lock = None  # the lock we hold, once held
        self.lock_taken: bool | None = None  # None until tried: right after the orchestrator connects
        for host, member in self.fleet.members.items():
            for step in asked_steps(plan, member):
                self.fleet.entries[host].ask(step.name)

    def run(self) -> None:
        fleet = self.fleet
        connected = [host for host, ok in zip(fleet.hosts, fleet.each_host(self.connect_host, fleet.hosts)) if ok]
        if connected and self.lock_taken is None:  # the orchestrator was not reached: lock on the first member
            self.lock_taken = bool(fleet.each_host(self.take_lock, connected[:1])[0])
        if not connected or not self.lock_taken:
            return
        request = snapshot_request(self.context)
        read = fleet.each_host(lambda host: self.steps.read_state(host, request), connected)
        snapshots = {host: snapshot for host, snapshot in zip(connected, read) if snapshot is not None}
        if not snapshots or self.report.interrupted:
            return
        orchestrator = fleet.host_of(self.plan.cluster.orchestrator)
        settled = settle_cluster_key(snapshots, orchestrator, self.plan.request.rotate_cluster_key,
                                     self.plan.cluster.name, lambda host: read_file(host, CLUSTER_PRIVATE_KEY))
        self.context.key, self.context.retired = settled.key, settled.retired
        self.report.settled_cluster_key(settled.key.fingerprint, settled.action, settled.note)
        if self.plan.request.ray:
            self.context.ray = settle_ray(snapshots, orchestrator, self.plan, self.report.run_id,
                                          lambda host: read_file(host, RAY_TOKEN))
        self.report.extensions = extension_sources(self.plan)
        for host, member in fleet.members.items():
            if host not in snapshots:
                self.context.member_finished(member, f"it was not reached: {fleet.entries[host].error}")
        try:
            fleet.each_host(lambda host: self.steps.run_steps(host, snapshots[host]), list(snapshots))
        finally:
            self.report.notes.extend(dict.fromkeys(self.context.notes))

    def connect_host(self, host):
        entry = self.fleet.entries[host]
        connected = self.connect(host, entry, self.plan.wait, self.fleet.policy, self.view)
        if connected:
            self.fleet.state.activate_host(host)
        self.view.connected(entry)
        if connected and self.fleet.members[host].role == ORCHESTRATOR:  # lock at once, while the others connect
            if self.context.relay is not None:
                self.context.relay.orchestrator_host = host
            self.lock_taken = self.take_lock(host)
        return connected

    def take_lock(self, host) -> bool:
        entry = self.fleet.entries[host]
        outcome = take_deploy_lock(lambda: self.open_lock(host), entry.address, self.plan.cluster.name,
                                   self.plan.wait, lambda words: self.view.note(entry, words))
        for other in self.report.hosts if outcome.failure else ():
            other.fail(outcome.failure)
        self.report.notes.extend([outcome.note] if outcome.note else [])
        self.lock = outcome.held
        return outcome.failure is None

    def interrupt(self, signum: int) -> None:
        """SIGINT or SIGTERM: stop every child and every host's work; the report says the run was interrupted."""
        self.report.interrupted = SIGNAL_NAMES[signum]
        stop_children()
        self.fleet.stop_phase(Interrupted)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.report.interrupted:
            remove_staging([host for host in self.fleet.hosts if host.connected], self.context.staging)
        self.fleet.disconnect()
