"""Ray's settlement for one run: the token the members keep (or a new one), who starts what, and what members wait
for from each other.

Members run their steps at once, each in its own greenlet; `RayCluster` is what they share: a factory's worker
starts only once the head is up (or known to be up already), and `--run` starts the runnable only once every
worker has joined. Whatever ends a member's run early resolves what others wait for (`member_finished`), so no
member waits for one that stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gevent.event import AsyncResult

from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.engine.ray_cluster import (
    HEAD_PROCESSES,
    RAY_STATE,
    RAY_TOKEN,
    WORKER_PROCESSES,
    HeldToken,
    desired_state,
    new_ray_token,
    parse_state,
    token_sha256,
    token_sources,
)
from flambe_iac.inputs.secrets_file import HiddenBytes

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

    def worker_must_start(self, snapshot) -> bool:
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


def outcome_of(result: AsyncResult, what: str):
    """What another member published, waiting for it; RayUnavailable if it failed or never came (gevent's own
    Timeout is not an Exception, and would end the host's greenlet without a cause)."""
    result.wait(MEMBERS_WAIT_TIMEOUT)
    if not result.ready():
        raise RayUnavailable(f"{what} did not come within {MEMBERS_WAIT_TIMEOUT / 3600:.0f} h")
    return result.get()


def settle_ray(snapshots: dict, orchestrator_host, plan, run_id: str, fetch_token) -> RayCluster:
    """Keep the Ray token the members hold (the orchestrator's first), or make one; then plan who starts what.
    --rotate-cluster-key rotates the token too (and so restarts Ray). SNAPSHOTS maps each reached member's handle to
    its snapshot; FETCH_TOKEN(handle) returns that member's token file, or None."""
    held = []
    for host, snapshot in snapshots.items():
        mode_and_digest = snapshot.files.get(RAY_TOKEN)
        held.append(HeldToken(host, host is orchestrator_host, mode_and_digest[1] if mode_and_digest else None))
    sources = token_sources(held, plan.request.rotate_cluster_key)
    token = next(filter(None, (matching_token(fetch_token(entry.member), entry.sha256) for entry in sources)), None)
    return RayCluster.plan(token or new_ray_token(), plan.ray_python, plan.cluster.orchestrator,
                           list(plan.cluster.factories), snapshots.get(orchestrator_host), run_id)


def matching_token(token: bytes | None, sha256: str) -> bytes | None:
    return token if token is not None and token_sha256(token) == sha256 else None
