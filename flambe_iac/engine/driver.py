"""Runs a DeployPlan: the order of the phases, and nothing else.

connect every host (waiting for sshd) -> read each host's snapshot -> settle the cluster key -> add each host's
asked steps from the step table -> run every host's steps, each host in a greenlet of its own -> clean up.

Each phase runs all hosts at once. Whatever happens on one host (an exception of any kind included) fails that
host with its cause and never stops the others; the report's table of outcomes is the only source of `ok`.
The caller must have patched the standard library with gevent (`flambe_iac.cli.deploy` does, first thing).
"""

from __future__ import annotations

import secrets
import signal
import time
from typing import TextIO

import gevent
from pyinfra.api.operations import run_host_op
from pyinfra.context import ctx_host, ctx_state

from flambe_iac.engine.cluster_key import (
    BUSY,
    LOCKED,
    HeldKey,
    ROTATED,
    cluster_key_comment,
    cluster_key_from_private,
    decide_cluster_key,
    deploy_lock_command,
    lock_holder_line,
    new_cluster_key,
    parse_retired_list,
)
from flambe_iac.ssh.policy import (
    HeldCommand,
    RemoteCommandError,
    SshPolicy,
    describe_connect_error,
    make_state,
    run_remote,
)
from flambe_iac.deploys.operations import stop_children
from flambe_iac.deploys.ray import RayCluster
from flambe_iac.deploys.snapshot import SnapshotError, read_snapshot
from flambe_iac.deploys.steps import STEP_NAMES, StepContext, asked_steps, extension_sources, snapshot_request
from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.inputs.plan import DeployPlan
from flambe_iac.engine.ray_cluster import RAY_TOKEN, HeldToken, new_ray_token, token_sha256, token_sources
from flambe_iac.engine.remote_layout import (
    CLUSTER_PRIVATE_KEY,
    CLUSTER_PUBLIC_KEY,
    DEPLOY_LOCK,
    RETIRED_KEYS,
)
from flambe_iac.engine.report import CHANGED, FAILED, UNCHANGED, DeployReport, HostReport, ProgressView, StepResult

SNAPSHOT_TIMEOUT = 120.0
CLEANUP_TIMEOUT = 10.0
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(gevent.GreenletExit):
    """Thrown into the phase's greenlets on SIGINT or SIGTERM: a BaseException, so no host's handler takes it,
    and a GreenletExit, so the greenlet ends quietly."""


def run_deploy(plan: DeployPlan, stream: TextIO, live: bool | None = None) -> DeployReport:
    started = time.monotonic()
    report = DeployReport(plan.cluster.name, [
        HostReport(member.id, member.role, plan.address(member), {name: StepResult() for name in STEP_NAMES})
        for member in plan.cluster.members
    ], run_id=new_run_id())
    deployment = Deployment(plan, report, ProgressView(report, stream, live))
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


def new_run_id() -> str:
    """Unique per run: names this run's staging directory, so two deploys at once never share an upload."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


class Deployment:
    """One run: the pyinfra state, the members by pyinfra host, and the report being filled in."""

    def __init__(self, plan: DeployPlan, report: DeployReport, view: ProgressView):
        self.plan = plan
        self.report = report
        self.view = view
        self.policy = SshPolicy(plan.cluster.ssh_user, plan.user_key.path, plan.user_key.passphrase,
                                plan.host_keys.known_hosts, plan.connect_timeout,
                                plan.host_keys.strict_host_key_checking, jump=plan.jump)
        self.state = make_state([(member.id, plan.address(member)) for member in plan.cluster.members], self.policy)
        self.members = {self.state.inventory.get_host(member.id): member for member in plan.cluster.members}
        self.entries = {host: entry for host, entry in zip(self.members, report.hosts)}
        self.context = StepContext(plan, self.policy, report.run_id)
        self.phase: list[gevent.Greenlet] = []
        self.lock: HeldCommand | None = None
        self.lock_taken: bool | None = None  # None until tried: right after the orchestrator connects
        for host, member in self.members.items():
            for step in asked_steps(plan, member):
                self.entries[host].ask(step.name)

    # -- phases, in order

    def run(self) -> None:
        members = list(self.members)
        connected = [host for host, value in zip(members, self.each_host(self.connect, members)) if value]
        if not connected:
            return
        if self.lock_taken is None:  # the orchestrator was not reached: lock on the first member that was
            self.lock_taken = bool(self.each_host(self.take_lock, connected[:1])[0])
        if not self.lock_taken:
            return
        request = snapshot_request(self.context)
        snapshots = {host: snapshot for host, snapshot
                     in zip(connected, self.each_host(lambda host: self.read_state(host, request), connected))
                     if snapshot is not None}
        if not snapshots or self.report.interrupted:
            return
        self.settle_cluster_key(snapshots)
        if self.plan.ray:
            self.settle_ray(snapshots)
        self.report.extensions = extension_sources(self.plan)
        for host, member in self.members.items():
            if host not in snapshots:
                self.context.member_finished(member, f"it was not reached: {self.entries[host].error}")
        try:
            self.each_host(lambda host: self.run_steps(host, snapshots[host]), list(snapshots))
        finally:
            self.report.notes.extend(dict.fromkeys(self.context.notes))

    def each_host(self, action, hosts: list) -> list:
        """ACTION(host) on every host at once, and what each returned (None for a host that failed): a host
        whose action raises fails with its cause, and the others go on."""
        if self.report.interrupted:
            return [None] * len(hosts)

        def guarded(host):
            try:
                return action(host)
            except Exception as error:  # anything at all from one host fails that host, never the run
                self.entries[host].fail(describe_exception(error))
                return None

        self.phase = [gevent.spawn(guarded, host) for host in hosts]
        gevent.joinall(self.phase)
        results = [greenlet.value for greenlet in self.phase]
        self.phase = []
        return results

    def connect(self, host):
        started = time.monotonic()
        entry = self.entries[host]
        deadline = started + self.plan.wait
        delay = 1.0
        while True:
            try:
                host.connect(show_errors=False, raise_exceptions=True)
                break
            except Exception as error:  # pyinfra raises ConnectError; anything else is a failure of this host too
                cause = describe_connect_error(str(error), self.policy, entry.address)
                if not is_worth_waiting_for(cause) or time.monotonic() + delay > deadline:
                    waited = time.monotonic() - started
                    entry.fail(cause + (f" (waited {waited:.0f} s for its sshd)" if self.plan.wait and
                                        is_worth_waiting_for(cause) else ""))
                    entry.connect_seconds = waited
                    self.view.connected(entry)
                    return None
                self.view.note(entry, f"waiting for sshd ({cause})")
                gevent.sleep(delay)
                delay = min(delay * 2, 10.0)
        entry.connect_seconds = time.monotonic() - started
        self.state.activate_host(host)
        self.view.connected(entry)
        if self.members[host].role == ORCHESTRATOR:  # lock at once, while the other hosts still connect
            if self.context.relay is not None:
                self.context.relay.orchestrator_host = host
            self.lock_taken = self.take_lock(host)
        return host

    def take_lock(self, host):
        """One deploy of a cluster at a time: an flock on the orchestrator (else the first member reached), held
        until this run ends or its heartbeat stops. A second deploy waits within --wait, then fails every host."""
        deadline = time.monotonic() + self.plan.wait
        while True:
            try:
                lock = HeldCommand(host, deploy_lock_command(DEPLOY_LOCK), lock_holder_line(), SNAPSHOT_TIMEOUT)
            except RemoteCommandError as error:
                for entry in self.report.hosts:
                    entry.fail(f"could not take the deploy lock on {self.entries[host].address}: {error}")
                return False
            if lock.first_line.decode(errors="replace") == LOCKED:
                self.lock = lock
                return True
            holder = lock.rest_of_output().decode(errors="replace").strip() or "someone (holder unknown)"
            lock.release()
            if lock.first_line.decode(errors="replace") != BUSY:
                self.report.notes.append(f"{self.entries[host].address} has no flock or bash: concurrent deploys "
                                         "of this cluster are not prevented (install util-linux)")
                return True
            cause = f"another deploy of {self.plan.cluster.name} is under way, from {holder}"
            if time.monotonic() + 2 > deadline:
                for entry in self.report.hosts:
                    entry.fail(cause + " (wait for it, or give --wait SECONDS)")
                return False
            self.view.note(self.entries[host], f"waiting: {cause}")
            gevent.sleep(2)

    def read_state(self, host, request):
        try:
            snapshot = read_snapshot(host, request, SNAPSHOT_TIMEOUT)
        except SnapshotError as error:
            self.entries[host].fail(str(error))
            return None
        needed = {tool for step in asked_steps(self.plan, self.members[host]) for tool in step.reads(self.context).tools}
        missing = sorted(snapshot.missing_tools & needed)
        if missing:
            self.entries[host].fail(f"{', '.join(missing)} not installed on the host: install {' and '.join(missing)}")
            return None
        return snapshot

    def settle_cluster_key(self, snapshots: dict) -> None:
        """Keep the key the hosts hold (the hosts are the state), or make one; and what is retired."""
        held = [HeldKey(host, self.members[host].role == ORCHESTRATOR,
                        (snapshot.contents.get(CLUSTER_PUBLIC_KEY) or b"").decode(errors="replace").strip() or None,
                        parse_retired_list(snapshot.contents.get(RETIRED_KEYS)))
                for host, snapshot in snapshots.items()]
        decision = decide_cluster_key(held, self.plan.rotate_cluster_key)
        comment = cluster_key_comment(self.plan.cluster.name)
        key = next(filter(None, (self.fetch_cluster_key(host, decision.keep, comment) for host in decision.sources)),
                   None)
        if decision.keep and key is None:
            decision.note = f"no member could hand over the cluster key {decision.keep}; a new key replaces it"
            decision.action, decision.retired = ROTATED, decision.retired | {decision.keep}
        self.context.key = key or new_cluster_key(comment)
        self.context.retired = decision.retired - {self.context.key.fingerprint}
        self.report.cluster_key_fingerprint = self.context.key.fingerprint
        self.report.cluster_key_action = decision.action
        if decision.note:
            self.report.notes.append(decision.note)

    def fetch_cluster_key(self, host, fingerprint: str, comment: str):
        try:
            result = run_remote(host, f"cat {CLUSTER_PRIVATE_KEY}", timeout=SNAPSHOT_TIMEOUT)
            key = cluster_key_from_private(result.stdout, comment) if result.exit_code == 0 else None
        except (RemoteCommandError, ValueError, TypeError):
            return None  # unreadable or damaged: another host's copy, or a new key, will do
        return key if key is not None and key.fingerprint == fingerprint else None

    def settle_ray(self, snapshots: dict) -> None:
        """Keep the Ray token the members hold (the orchestrator's first), or make one; then plan who starts what.
        --rotate-cluster-key rotates the token too (and so restarts Ray)."""
        held = []
        for host, snapshot in snapshots.items():
            mode_and_digest = snapshot.files.get(RAY_TOKEN)
            held.append(HeldToken(host, self.members[host].role == ORCHESTRATOR,
                                  mode_and_digest[1] if mode_and_digest else None))
        sources = token_sources(held, self.plan.rotate_cluster_key)
        token = next(filter(None, (self.fetch_ray_token(entry.member, entry.sha256) for entry in sources)), None)
        orchestrator = self.plan.cluster.orchestrator
        orchestrator_host = next((host for host, member in self.members.items() if member is orchestrator), None)
        self.context.ray = RayCluster.plan(token or new_ray_token(), self.plan.ray_python, orchestrator,
                                           list(self.plan.cluster.factories), snapshots.get(orchestrator_host),
                                           self.report.run_id)

    def fetch_ray_token(self, host, sha256: str) -> bytes | None:
        try:
            result = run_remote(host, f"cat {RAY_TOKEN}", timeout=SNAPSHOT_TIMEOUT)
        except RemoteCommandError:
            return None  # another member's copy, or a new token, will do
        return result.stdout if result.exit_code == 0 and token_sha256(result.stdout) == sha256 else None

    def run_steps(self, host, snapshot) -> None:
        try:
            self.run_asked_steps(host, snapshot)
        finally:
            self.context.member_finished(self.members[host], self.entries[host].error)

    def run_asked_steps(self, host, snapshot) -> None:
        member, entry = self.members[host], self.entries[host]
        for step in asked_steps(self.plan, member):
            started = time.monotonic()
            with ctx_state.use(self.state), ctx_host.use(host):
                metas = step.deploy(self.context, member, snapshot)
            status, cause = self.run_operations(host, step.name, metas)
            entry.steps[step.name].seconds = time.monotonic() - started
            entry.steps[step.name].detail = self.context.details.pop(host.name, None)
            entry.finish(step.name, status, cause)
            self.view.step_done(entry, step.name)
            if status == FAILED:
                entry.fail(f"{step.name} failed")
                return

    def run_operations(self, host, step: str, metas: list) -> tuple[str, str | None]:
        self.context.causes.pop(host.name, None)
        changed = False
        for meta in metas:
            try:
                with ctx_state.use(self.state), ctx_host.use(host):
                    succeeded = run_host_op(self.state, host, meta._hash)
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
        transport = host.connector.client.get_transport() if getattr(host.connector, "client", None) else None
        if transport is None or not transport.is_active():
            return "the connection to the host dropped"
        return "the command failed without saying why (run with -v to see pyinfra's log)"

    # -- interrupts and the end

    def interrupt(self, signum: int) -> None:
        """SIGINT or SIGTERM: stop every child and every host's work; the report says the run was interrupted."""
        self.report.interrupted = SIGNAL_NAMES[signum]
        stop_children()
        gevent.killall(self.phase, Interrupted, block=False)

    def close(self) -> None:
        """Release the lock; after an interrupt, remove this run's staging directory on every host it reached (each
        upload removes its own when it ends); disconnect."""
        staging = self.context.staging
        connected = [host for host in self.members if host.connected]
        if self.lock is not None:
            self.lock.release()
        if not self.report.interrupted:
            connected_for_cleanup = []
        else:
            connected_for_cleanup = connected

        def clean(host):
            try:
                run_remote(host, f"rm -rf {staging}", timeout=CLEANUP_TIMEOUT)
            except RemoteCommandError:
                pass  # the host is gone; the next run's staging is a new directory anyway

        gevent.joinall([gevent.spawn(clean, host) for host in connected_for_cleanup], timeout=CLEANUP_TIMEOUT)
        self.policy.close()
        for host in connected:
            try:
                host.disconnect()
            except Exception:  # closing a connection that already broke must not hide the report
                continue


def is_worth_waiting_for(cause: str) -> bool:
    """A host still booting refuses or ignores connections; a wrong key or host key will not fix itself."""
    lowered = cause.lower()
    return not (cause.startswith("REFUSED") or "refused the key" in lowered)


def describe_exception(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "the connection to the host dropped (EOF)"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
