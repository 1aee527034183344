"""`--ray`: the token on every member, the head on the orchestrator, a worker on every factory.

What the members share and wait for is `engine.ray_settlement.RayCluster`; the commands are `engine.ray_cluster`'s.
"""

from __future__ import annotations

from pyinfra.api import operation

from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.deploys.operations import host_function, ran, staged_files
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.engine.ray_cluster import (
    GCS_PORT,
    HEAD_PROCESSES,
    RAY_STATE,
    RAY_TOKEN,
    parse_start_output,
    start_command,
    stop_command,
)
from flambe_iac.engine.ray_settlement import Head, RayCluster, RayUnavailable, outcome_of

READS = SnapshotRequest(files=(RAY_TOKEN,), contents=(RAY_STATE,), processes=(*HEAD_PROCESSES,),
                        tools=("pgrep", "tar"))
START_TIMEOUT = 300.0


def reads(context) -> SnapshotRequest:
    return READS


def ray_step(context, member, snapshot: HostSnapshot) -> list:
    if context.plan.request.ray_stop:
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
    yield host_function(_start_head, ray, member, causes, details, causes=causes)


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
    yield host_function(_start_worker, ray, member, causes, details, causes=causes)


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
    result = ran(host, command, causes, "starting Ray did not finish", timeout=START_TIMEOUT)
    if result is None:
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
    yield host_function(_stop_ray, python, causes, causes=causes)


def _stop_ray(state, host, python: str, causes: dict) -> bool:
    result = ran(host, stop_command(python), causes, "stopping Ray did not finish", timeout=START_TIMEOUT)
    if result is None:
        return False
    if b"@stopped" not in result.stdout:
        causes[host.name] = f"Ray still runs after `ray stop` with {python}: {result.reason}"
        return False
    return True


@operation(is_idempotent=False)
def wait_for_workers(ray: RayCluster, causes: dict):
    """Before --run: the runnable starts only on the whole cluster."""
    yield host_function(_wait_for_workers, ray, causes, causes=causes)


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
