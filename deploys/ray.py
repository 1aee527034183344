"""`--ray`: the token on every member, the head on the orchestrator, a worker on every factory (see ray_cluster).

Members run their steps at once, each in its own greenlet; `RayCluster` is what they share: a factory's worker
starts only once the head is up (or known to be up already), and `--run` starts the runnable only once every
worker has joined. Whatever ends a member's run early resolves what others wait for (`member_finished`), so no
member waits for one that stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gevent.event import AsyncResult
from pyinfra.api import FunctionCommand, operation

from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.ssh.policy import RemoteCommandError, run_remote
from flambe_iac.deploys.operations import staged_files
from flambe_iac.deploys.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.engine.ray_cluster import (
    GCS_PORT,
    HEAD_PROCESSES,
    RAY_STATE,
    RAY_TOKEN,
    WORKER_PROCESSES,
    desired_state,
    parse_start_output,
    parse_state,
    start_command,
    stop_command,
)
from flambe_iac.inputs.secrets_file import HiddenBytes

READS = SnapshotRequest(files=(RAY_TOKEN,), contents=(RAY_STATE,), processes=(*HEAD_PROCESSES,),
                        tools=("pgrep", "tar"))
START_TIMEOUT = 300.0
MEMBERS_WAIT_TIMEOUT = 8 * 3600.0  # the head may come after hours of setup commands


class RayUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Head:
    address: str
    version: str
    started_by: str


@dataclass
class RayCluster:
    """This run's Ray plan, decided from every member's snapshot, and what members wait for from each other."""

    token: HiddenBytes
    python: str
    head_address: str
    run_id: str
    head_starts: bool
    head: AsyncResult = field(default_factory=AsyncResult)  # a Head, or RayUnavailable
    workers: dict[str, AsyncResult] = field(default_factory=dict)  # factory id -> True once joined, else a cause

    @classmethod
    def plan(cls, token: bytes, python: str, orchestrator, factories: list, orchestrator_snapshot, run_id: str):
        head_address = orchestrator.private_ip
        cluster = cls(HiddenBytes(token), python, head_address, run_id, head_starts=True,
                      workers={factory.id: AsyncResult() for factory in factories})
        if orchestrator_snapshot is None:
            cluster.head.set_exception(RayUnavailable("the orchestrator was not reached"))
            return cluster
        recorded = parse_state(orchestrator_snapshot.contents.get(RAY_STATE))
        if recorded.desired == cluster.head_desired and set(HEAD_PROCESSES) <= orchestrator_snapshot.running:
            cluster.head_starts = False
            cluster.head.set(Head(head_address, recorded.ray_version, recorded.started_by))
        return cluster

    @property
    def head_desired(self) -> str:
        return desired_state("head", self.python, self.head_address, self.token.data)

    def worker_desired(self, head_started_by: str) -> str:
        return desired_state("worker", self.python, self.head_address, self.token.data, head_started_by)

    def worker_must_start(self, snapshot: HostSnapshot) -> bool:
        if self.head_starts or not self.head.successful():
            return True
        recorded = parse_state(snapshot.contents.get(RAY_STATE))
        return not (recorded.desired == self.worker_desired(self.head.value.started_by)
                    and set(WORKER_PROCESSES) <= snapshot.running)

    def member_finished(self, member, cause: str | None) -> None:
        """MEMBER's run ended (done, failed or never reached): whatever it had not yet resolved, it never will."""
        cause = cause or "it stopped before its Ray step"
        if member.role == ORCHESTRATOR and not self.head.ready():
            self.head.set_exception(RayUnavailable(f"the orchestrator failed: {cause}"))
        elif member.id in self.workers and not self.workers[member.id].ready():
            self.workers[member.id].set(cause)


def reads(context) -> SnapshotRequest:
    return READS


def ray_step(context, member, snapshot: HostSnapshot) -> list:
    if context.plan.ray_stop:
        stopping = RAY_STATE in snapshot.contents or snapshot.running
        return [stop_ray(name="stop Ray", python=context.plan.ray_python, causes=context.causes)] if stopping else []
    ray: RayCluster = context.ray
    operations = [staged_files(name="Ray token", files=[(RAY_TOKEN, ray.token, "600")], snapshot=snapshot,
                               staging=context.staging, causes=context.causes)]
    if member.role == ORCHESTRATOR:
        if ray.head_starts:
            operations.append(start_head(name="start the Ray head", ray=ray, member=member, causes=context.causes,
                                         details=context.details))
        else:
            context.details[member.id] = f"Ray {ray.head.value.version} head at {ray.head_address}:{GCS_PORT}, running"
    elif ray.worker_must_start(snapshot):
        operations.append(start_worker(name="start the Ray worker", ray=ray, member=member, causes=context.causes,
                                       details=context.details))
    else:
        ray.workers[member.id].set(True)
        context.details[member.id] = f"Ray worker joined to {ray.head_address}:{GCS_PORT}, running"
    return operations


@operation(is_idempotent=False)
def start_head(ray: RayCluster, member, causes: dict, details: dict):
    yield FunctionCommand(_start_head, (ray, member, causes, details), {})


def _start_head(state, host, ray: RayCluster, member, causes: dict, details: dict) -> bool:
    command = start_command(ray.python, member.private_ip, ray.head_address, ray.head_desired, ray.run_id)
    outcome = _start(host, command, ray.python, causes)
    if outcome is None:
        ray.head.set_exception(RayUnavailable(causes[host.name]))
        return False
    ray.head.set(Head(ray.head_address, outcome.version, ray.run_id))
    details[host.name] = f"Ray {outcome.version} head at {ray.head_address}:{GCS_PORT}, started"
    return True


@operation(is_idempotent=False)
def start_worker(ray: RayCluster, member, causes: dict, details: dict):
    yield FunctionCommand(_start_worker, (ray, member, causes, details), {})


def outcome_of(result: AsyncResult, what: str):
    """What another member published, waiting for it; RayUnavailable if it failed or never came (gevent's own
    Timeout is not an Exception, and would end the host's greenlet without a cause)."""
    result.wait(MEMBERS_WAIT_TIMEOUT)
    if not result.ready():
        raise RayUnavailable(f"{what} did not come within {MEMBERS_WAIT_TIMEOUT / 3600:.0f} h")
    return result.get()


def _start_worker(state, host, ray: RayCluster, member, causes: dict, details: dict) -> bool:
    try:
        head: Head = outcome_of(ray.head, "the head's start")
    except RayUnavailable as error:
        causes[host.name] = f"the Ray head did not start: {error}"
        ray.workers[member.id].set(causes[host.name])
        return False
    command = start_command(ray.python, member.private_ip, ray.head_address, ray.worker_desired(head.started_by),
                            ray.run_id, expected_version=head.version or "unknown")
    outcome = _start(host, command, ray.python, causes, head)
    if outcome is None:
        ray.workers[member.id].set(causes[host.name])
        return False
    ray.workers[member.id].set(True)
    details[host.name] = f"Ray {outcome.version} worker joined {head.address}:{GCS_PORT}"
    return True


def _start(host, command: str, python: str, causes: dict, head: Head | None = None):
    """Run a start command; the outcome if Ray started, else None with the cause in words in CAUSES."""
    try:
        result = run_remote(host, command, timeout=START_TIMEOUT)
    except RemoteCommandError as error:
        causes[host.name] = f"starting Ray did not finish: {error}"
        return None
    outcome = parse_start_output(result.stdout)
    if outcome.status == "started":
        return outcome
    if outcome.status == "no-ray":
        causes[host.name] = (f"{python} has no Ray ({outcome.detail}): install ray[default] for it (in the AMI, "
                             "with --setup, or with -i), or give --ray-python PATH")
    elif outcome.status == "mismatch":
        causes[host.name] = (f"Ray {outcome.version} here, but the head on the orchestrator runs Ray {head.version}: "
                             "every member needs the same version")
    else:
        causes[host.name] = f"ray start failed: {outcome.detail or result.reason}"
    return None


@operation(is_idempotent=False)
def stop_ray(python: str, causes: dict):
    yield FunctionCommand(_stop_ray, (python, causes), {})


def _stop_ray(state, host, python: str, causes: dict) -> bool:
    try:
        result = run_remote(host, stop_command(python), timeout=START_TIMEOUT)
    except RemoteCommandError as error:
        causes[host.name] = f"stopping Ray did not finish: {error}"
        return False
    if b"@stopped" not in result.stdout:
        causes[host.name] = f"Ray still runs after `ray stop` with {python}: {result.reason}"
        return False
    return True


@operation(is_idempotent=False)
def wait_for_workers(ray: RayCluster, causes: dict):
    """Before --run: the runnable starts only on the whole cluster."""
    yield FunctionCommand(_wait_for_workers, (ray, causes), {})


def _wait_for_workers(state, host, ray: RayCluster, causes: dict) -> bool:
    missing = {}
    for factory_id, joined in ray.workers.items():
        try:
            outcome = outcome_of(joined, "its worker's start")
        except RayUnavailable as error:
            outcome = str(error)
        if outcome is not True:
            missing[factory_id] = outcome
    if missing:
        causes[host.name] = ("not starting the runnable on part of the cluster: Ray did not start on "
                             + "; ".join(f"{factory_id} ({cause})" for factory_id, cause in missing.items()))
        return False
    return True
