"""Runs a DeployPlan with pyinfra: connect to every host at once, settle the cluster key, push, and report.

The caller must have patched the standard library with gevent (`flambe_iac.deploy_cli` does, first thing);
without it, connections run one after another.
"""

from __future__ import annotations

import json
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import TextIO

import gevent
from pyinfra.api import BaseStateCallback, Config, Inventory, State
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operations import run_ops
from pyinfra.context import ctx_host, ctx_state

from flambe_iac import __version__
from flambe_iac.cluster import ORCHESTRATOR, Host as Member
from flambe_iac.deploys.cluster_key import install_cluster_key
from flambe_iac.deploys.cluster_key import EDITED_FILES
from flambe_iac.deploys.facts import HostState
from flambe_iac.deploys.manifest import write_manifest
from flambe_iac.deploys.extensions import install_extensions, push_extensions
from flambe_iac.deploys.resources import sync_resources
from flambe_iac.deploys.runnable import launch_runnable
from flambe_iac.deploys.secrets import push_secrets
from flambe_iac.host_keys import keys_in, read_known_hosts
from flambe_iac.keys import ClusterKey, cluster_key_from_private, new_cluster_key, same_public_key
from flambe_iac.plan import DeployPlan
from flambe_iac.remote_layout import (
    CLUSTER_PRIVATE_KEY,
    CLUSTER_PUBLIC_KEY,
    MANIFEST as MANIFEST_FILE,
    MEMBERS_KNOWN_HOSTS,
    RESOURCES_DIR,
    RUNNER_LIBRARY,
    SECRETS as SECRETS_FILE,
    cluster_key_comment,
    manifest,
    members_known_hosts,
)
from flambe_iac.report import (
    CHANGED,
    CLUSTER_KEY,
    EXTENSIONS,
    FAILED,
    INSTALL,
    MANIFEST,
    PENDING,
    RESOURCES,
    RUN,
    SECRETS,
    SKIPPED,
    UNCHANGED,
    DeployReport,
    HostReport,
    ProgressView,
)
from flambe_iac.extensions import redact_url
from flambe_iac.resources import Resource, checksums, local_tree
from flambe_iac.ssh_options import ASKPASS_SCRIPT, RsyncJob, SshTarget, askpass_environment, rsync_command


def run_deploy(plan: DeployPlan, stream: TextIO, live: bool | None = None) -> DeployReport:
    started = time.monotonic()
    report = DeployReport(plan.cluster.name, [
        HostReport(member.id, member.role, plan.address(member)) for member in plan.cluster.members
    ])
    deployment = Deployment(plan, report, ProgressView(report, stream, live))
    try:
        deployment.run()
    finally:
        deployment.close()
        report.seconds = time.monotonic() - started
    return report


class Deployment:
    """One run: the pyinfra state, the members by pyinfra host, and the report being filled in."""

    def __init__(self, plan: DeployPlan, report: DeployReport, view: ProgressView):
        self.plan = plan
        self.report = report
        self.view = view
        self.state = make_state(plan)
        self.members = {self.state.inventory.get_host(member.id): member for member in plan.cluster.members}
        self.rsync_failures: dict[str, str] = {}
        self.step_metas: dict = {}  # (pyinfra host, step) -> [OperationMeta]
        self.private_directory: tempfile.TemporaryDirectory | None = None
        self.snapshots: dict = {}  # pyinfra host -> HostSnapshot

    def host_report(self, host) -> HostReport:
        return next(entry for entry in self.report.hosts if entry.host_id == host.name)

    # -- phases

    def run(self) -> None:
        connected = self.connect_all()
        if not connected:
            return
        self.read_snapshots(connected)
        key, retired = self.settle_cluster_key(connected)
        self.report.cluster_key_fingerprint = key.fingerprint
        self.report.extensions = extension_sources(self.plan)
        self.add_steps([host for host in connected if host in self.snapshots], key, retired)
        self.state.add_callback_handler(StepProgress(self))
        try:
            run_ops(self.state)
        except PyinfraError:
            pass  # every host failed; the report says why for each
        self.collect_results()

    def connect_all(self) -> list:
        def connect(host):
            started = time.monotonic()
            entry = self.host_report(host)
            try:
                host.connect(show_errors=False, raise_exceptions=True)
            except Exception as error:  # pyinfra raises ConnectError; anything else is a failure of this host too
                entry.error = describe_connect_error(str(error), self.plan, entry.address)
                for step in entry.steps.values():
                    step.status = SKIPPED
            entry.connect_seconds = time.monotonic() - started
            self.view.connected(entry)

        hosts = list(self.members)
        gevent.joinall([self.state.pool.spawn(connect, host) for host in hosts])
        connected = [host for host in hosts if host.connected]
        for host in connected:
            self.state.activate_host(host)
        return connected

    def read_snapshots(self, hosts: list) -> None:
        """One round trip per host, all hosts at once: the state every step compares against."""
        files = [CLUSTER_PRIVATE_KEY, CLUSTER_PUBLIC_KEY, *EDITED_FILES, MEMBERS_KNOWN_HOSTS, SECRETS_FILE,
                 MANIFEST_FILE]
        contents = [CLUSTER_PUBLIC_KEY, *EDITED_FILES]
        trees = [tree.remote_directory for tree in self.all_trees]
        self.snapshots = self.read_on_each(
            hosts, lambda host: host.get_fact(HostState, files=files, contents=contents, trees=trees))

    def settle_cluster_key(self, hosts: list) -> tuple[ClusterKey, list[str]]:
        """Keep the key the hosts hold (the hosts are the state), or make one; and which keys are retired."""
        comment = cluster_key_comment(self.plan.cluster.name)
        held = {host: snapshot.contents[CLUSTER_PUBLIC_KEY].decode().strip()
                for host, snapshot in self.snapshots.items()
                if host in hosts and (snapshot.contents.get(CLUSTER_PUBLIC_KEY) or b"").strip()}
        retired = sorted(set(held.values()))
        if self.plan.rotate_cluster_key or not held:
            self.report.cluster_key_action = "rotated" if held else "created"
            return new_cluster_key(comment), retired
        # The orchestrator's key first, then any factory's.
        for host in sorted(held, key=lambda host: self.members[host].role != "orchestrator"):
            key = self.fetch_cluster_key(host, held[host], comment)
            if key is not None:
                self.report.cluster_key_action = "kept"
                return key, [line for line in retired if not same_public_key(line, key.public_line)]
        self.report.cluster_key_action = "created"
        return new_cluster_key(comment), retired

    def fetch_cluster_key(self, host, public_line: str, comment: str) -> ClusterKey | None:
        buffer = BytesIO()
        try:
            if not host.get_file(CLUSTER_PRIVATE_KEY, buffer):
                return None
            key = cluster_key_from_private(buffer.getvalue(), comment)
        except Exception:
            return None  # unreadable or damaged: another host's copy, or a new key, will do
        return key if same_public_key(key.public_line, public_line) else None

    def read_on_each(self, hosts: list, read) -> dict:
        """READ(host) on every host at once; a host whose read fails is marked failed and left out."""
        results = {}

        def read_one(host):
            try:
                results[host] = read(host)
            except Exception as error:
                self.fail_host(host, f"could not read the host's state: {error}")

        gevent.joinall([self.state.pool.spawn(read_one, host) for host in hosts])
        return results

    @property
    def all_trees(self) -> list[Resource]:
        """Every directory tree this deploy keeps in sync: resources, extensions, and the runner's flambe_iac."""
        trees = [*self.plan.resources, *self.plan.extension_trees]
        if self.plan.run:
            trees.append(runner_library())
        return trees

    def add_steps(self, hosts: list, key: ClusterKey, retired: list[str]) -> None:
        plan = self.plan
        pinned = read_known_hosts(plan.host_keys.known_hosts)
        member_keys = {member.private_ip: keys_in(pinned, plan.address(member)) for member in plan.cluster.members}
        known_hosts = members_known_hosts(member_keys)
        private_addresses = [member.private_ip for member in plan.cluster.members]
        resource_checksums = {resource.name: checksums(resource) for resource in plan.resources}
        expected_trees = {tree.remote_directory: local_tree(tree) for tree in self.all_trees}
        with ctx_state.use(self.state):
            for host in hosts:
                member = self.members[host]
                snapshot = self.snapshots[host]
                transfers = {tree.remote_directory: self.transfer(member, tree, expected_trees)
                             for tree in self.all_trees}
                with ctx_host.use(host):
                    self.step_metas[host, CLUSTER_KEY] = install_cluster_key(
                        plan.cluster.name, plan.cluster.ssh_user, key, known_hosts, private_addresses, retired,
                        snapshot)
                    if plan.secrets is not None:
                        self.step_metas[host, SECRETS] = push_secrets(plan.secrets, snapshot)
                    if plan.resources:
                        self.step_metas[host, RESOURCES] = sync_resources(
                            [transfers[tree.remote_directory] for tree in plan.resources], self.rsync_failures,
                            snapshot)
                    if plan.extension_trees:
                        self.step_metas[host, EXTENSIONS] = push_extensions(
                            [transfers[tree.remote_directory] for tree in plan.extension_trees],
                            self.rsync_failures, snapshot)
                    if plan.install_extensions:
                        self.step_metas[host, INSTALL] = install_extensions(pip_targets(plan))
                    self.step_metas[host, MANIFEST] = write_manifest(
                        self.manifest_for(member, key, resource_checksums), snapshot)
                    if plan.run and member.role == ORCHESTRATOR:
                        self.step_metas[host, RUN] = launch_runnable(
                            transfers[runner_library().remote_directory], run_plan(plan), plan.force,
                            self.rsync_failures, snapshot)

    def transfer(self, member: Member, tree: Resource, expected_trees: dict) -> tuple[str, set, RsyncJob]:
        """(remote directory, what it should hold, the rsync that makes it so) for one tree on one member."""
        passphrase = self.plan.user_key.passphrase
        target = SshTarget(
            address=self.plan.address(member), user=self.plan.cluster.ssh_user, key=self.plan.user_key.path,
            known_hosts=self.plan.host_keys.known_hosts, connect_timeout=self.plan.connect_timeout,
            batch_mode=passphrase is None,
        )
        environment = askpass_environment(self.askpass_helper(), passphrase) if passphrase else None
        argv = rsync_command(tree.rsync_source, f"{tree.remote_directory}/", target, excludes=tree.excludes)
        return tree.remote_directory, expected_trees[tree.remote_directory], RsyncJob(argv, environment)

    def askpass_helper(self) -> Path:
        if self.private_directory is None:
            self.private_directory = tempfile.TemporaryDirectory(prefix="flambe-deploy-")
        helper = Path(self.private_directory.name) / "askpass"
        if not helper.exists():
            helper.write_text(ASKPASS_SCRIPT)
            helper.chmod(0o700)
        return helper

    def manifest_for(self, member: Member, key: ClusterKey, resource_checksums: dict) -> bytes:
        members = [{"id": other.id, "role": other.role, "private_ip": other.private_ip}
                   for other in self.plan.cluster.members]
        return manifest(self.plan.cluster.name, member.role, member.id, members, key.fingerprint,
                        resource_checksums, __version__, extension_sources(self.plan))

    # -- results

    def fail_host(self, host, reason: str) -> None:
        entry = self.host_report(host)
        entry.error = entry.error or reason
        try:
            self.state.fail_hosts({host})
        except PyinfraError:
            pass  # pyinfra raises once no host is left; we report every host anyway

    def step_status(self, host, step: str) -> str:
        metas = self.step_metas.get((host, step))
        if metas is None:
            return SKIPPED  # not asked for, or not for this host (--run is the orchestrator's)
        if not all(meta.is_complete() for meta in metas):
            return FAILED if any(meta.is_complete() and not meta.did_succeed() for meta in metas) else PENDING
        if not all(meta.did_succeed() for meta in metas):
            return FAILED
        return CHANGED if any(meta.did_change() for meta in metas) else UNCHANGED

    def collect_results(self) -> None:
        for host in self.members:
            entry = self.host_report(host)
            if entry.error and not host.connected:
                continue
            for step, result in entry.steps.items():
                status = self.step_status(host, step)
                result.status = SKIPPED if status == PENDING else status  # never reached: an earlier step failed
            failed_step = next((step for step, result in entry.steps.items() if result.status == FAILED), None)
            if failed_step and not entry.error:
                entry.error = self.rsync_failures.get(host.name) or self.step_error(host, failed_step)
            if host in self.state.failed_hosts and not entry.error:
                entry.error = "pyinfra stopped this host (run with -v to see its log)"

    def step_error(self, host, step: str) -> str:
        for meta in self.step_metas.get((host, step), []):
            if meta.is_complete() and not meta.did_succeed():
                stderr = " ".join(meta.stderr_lines[-3:]).strip()
                return f"{step} failed" + (f": {stderr}" if stderr else "")
        return f"{step} failed"

    def close(self) -> None:
        """Remove the askpass helper's directory, and disconnect from every host."""
        if self.private_directory is not None:
            self.private_directory.cleanup()
        for host in self.members:
            if host.connected:
                try:
                    host.disconnect()
                except Exception:
                    pass


class StepProgress(BaseStateCallback):
    """Times each step on each host and tells the view as steps finish."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.started: dict = {}

    def operation_host_start(self, state, host, op_hash):
        self.started[host, op_hash] = time.monotonic()

    # pyinfra calls these just before it records the operation's result, in the same greenlet and with no
    # I/O in between; a greenlet spawned here runs after that record is made.
    def operation_host_success(self, state, host, op_hash, retry_count=0):
        gevent.spawn(self.finish, host, op_hash, time.monotonic())

    def operation_host_error(self, state, host, op_hash, retry_count=0, max_retries=0):
        gevent.spawn(self.finish, host, op_hash, time.monotonic())

    def finish(self, host, op_hash, ended: float) -> None:
        deployment = self.deployment
        step = next((step for (step_host, step), metas in deployment.step_metas.items()
                     if step_host is host and any(meta._hash == op_hash for meta in metas)), None)
        if step is None:
            return
        entry = deployment.host_report(host)
        entry.steps[step].seconds += ended - self.started.pop((host, op_hash), ended)
        status = deployment.step_status(host, step)
        if status == PENDING:
            return
        entry.steps[step].status = status
        if status == FAILED:
            entry.error = deployment.rsync_failures.get(host.name) or deployment.step_error(host, step)
        deployment.view.step_done(entry, step)


def runner_library() -> Resource:
    """This machine's flambe_iac package, for the runner on the orchestrator: the same version, always."""
    import flambe_iac

    return Resource("flambe_iac", Path(flambe_iac.__file__).parent, parent=RUNNER_LIBRARY, excludes=("__pycache__",))


def pip_targets(plan: DeployPlan) -> list[str]:
    return [f"./{tree.remote_directory}" for tree in plan.extension_trees] + plan.extension_requirements


def run_plan(plan: DeployPlan) -> bytes:
    """~/.flambe/run.json: what the runner runs, with paths relative to the home directory. No secret in it."""
    document = {
        "runnable": plan.runnable.runnable,
        "args": plan.runnable.args,
        "resources": {name: f"{RESOURCES_DIR}/{name}" for name in plan.runnable.resources},
        "secrets": SECRETS_FILE,
        "import_paths": [RUNNER_LIBRARY] + [tree.remote_directory for tree in plan.extension_trees],
        "flambe_iac_version": __version__,
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def extension_sources(plan: DeployPlan) -> dict[str, dict]:
    """Where each extension came from and, for git, the exact commit: for the report and the manifest."""
    return {checkout.location.name: {"kind": checkout.location.kind, "location": redact_url(checkout.location.text),
                                     "commit": checkout.commit} for checkout in plan.extensions}


def make_state(plan: DeployPlan) -> State:
    members = plan.cluster.members
    host_data = {
        "ssh_hostname": None,
        "ssh_user": plan.cluster.ssh_user,
        "ssh_key": str(plan.user_key.path),
        "ssh_allow_agent": False,
        "ssh_look_for_keys": False,
        "ssh_forward_agent": False,
        "ssh_config_file": "/dev/null",
        "ssh_known_hosts_file": str(plan.host_keys.known_hosts),
        "ssh_strict_host_key_checking": plan.host_keys.strict_host_key_checking,
        "ssh_paramiko_connect_kwargs": {
            "allow_agent": False, "look_for_keys": False,
            # A host that accepts TCP but never speaks SSH must not hold the deploy longer than a dead one.
            "banner_timeout": plan.connect_timeout, "auth_timeout": plan.connect_timeout,
        },
    }
    if plan.user_key.passphrase:
        host_data["ssh_key_password"] = plan.user_key.passphrase
    names = [(member.id, {**host_data, "ssh_hostname": plan.address(member)}) for member in members]
    config = Config(CONNECT_TIMEOUT=plan.connect_timeout, PARALLEL=max(len(members), 1))
    return State(Inventory((names, {})), config, check_for_changes=False)


def describe_connect_error(message: str, plan: DeployPlan, address: str) -> str:
    if "host key" in message.lower() and "does not match" in message.lower():
        return (f"REFUSED: the host key of {address} does not match the key pinned in {plan.host_keys.known_hosts}; "
                "nothing was sent. If the host was rebuilt, remove its old line from that file and pin the new key")
    if "No host key for" in message:
        return f"REFUSED: no pinned host key for {address} in {plan.host_keys.known_hosts}; nothing was sent"
    if "Authentication" in message:
        return f"the host refused the key {plan.user_key.path} for user {plan.cluster.ssh_user!r}"
    return message
