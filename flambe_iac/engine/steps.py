"""What every step of one run shares, and how the engine reads a step table it is handed.

A step table (deploys/steps.py declares the one the deploy runs) lists each step's name, what it reads from the
one-round-trip host snapshot, when it applies, and its deploy. The engine never imports the deploys: the driver is
handed the table (`StepTable`), and every phase reads it through the run's `StepContext`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import gevent

import flambe_iac
from flambe_iac import __version__
from flambe_iac.cluster import Host as Member
from flambe_iac.engine.cluster_key import ClusterKey
from flambe_iac.engine.fan_out import DIRECT, FanOut, tree_modes
from flambe_iac.engine.ray_settlement import RayCluster as Ray
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.inputs.checksum_cache import ChecksumCache
from flambe_iac.inputs.extensions import redact_url
from flambe_iac.inputs.plan import DeployPlan
from flambe_iac.inputs.resources import Resource, checksums
from flambe_iac.inputs.tree_listing import LocalTree, walk_tree
from flambe_iac.remote_layout import MANIFEST, RUNNER_LIBRARY, members_known_hosts, run_staging_dir
from flambe_iac.remote_layout import manifest as manifest_content
from flambe_iac.ssh.host_keys import keys_in, read_known_hosts
from flambe_iac.ssh.policy import SshPolicy


@dataclass(frozen=True)
class Step:
    name: str
    reads: Callable[[StepContext], SnapshotRequest]
    applies: Callable[[DeployPlan, Member], bool]
    deploy: Callable[[StepContext, Member, HostSnapshot], list]


@dataclass(frozen=True)
class StepTable:
    """The steps a run takes, in order, and what every run reads besides (whether the autostop agent runs)."""

    steps: tuple[Step, ...]
    always_read: SnapshotRequest = SnapshotRequest()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)


def always(plan: DeployPlan, member: Member) -> bool:
    return True


def asked_steps(context: StepContext, member: Member) -> list[Step]:
    return [step for step in context.table.steps if step.applies(context.plan, member)]


def snapshot_request(context: StepContext) -> SnapshotRequest:
    """Everything any asked step reads, and what every run reads, merged into the one read per host."""
    request = context.table.always_read
    for step in context.table.steps:
        if any(step.applies(context.plan, member) for member in context.plan.cluster.members):
            request = request | step.reads(context)
    return request


@dataclass
class StepContext:
    """What every step of one run shares: the plan, the cluster key, this run's staging, and the causes of
    failures (host name -> words) that operations record for the report."""

    plan: DeployPlan
    policy: SshPolicy
    run_id: str
    table: StepTable = StepTable(())
    writes_stopped: Callable[[], str | None] = lambda: None  # why nothing more may be written (the lock is lost)
    key: ClusterKey | None = None
    retired: set[str] = field(default_factory=set)
    causes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # for the report: e.g. a relay that fell back to direct
    details: dict[str, str] = field(default_factory=dict)  # host name -> what a step did, e.g. setup exit codes
    ray: Ray | None = None  # with --ray: the plan the members share, settled from their snapshots
    manifests: dict[str, bytes] = field(default_factory=dict)  # member id -> its ~/.flambe/cluster.json
    uplink: float | None = None  # bytes a second from here to the orchestrator, as measured, for --fan-out auto

    @property
    def staging(self) -> str:
        return run_staging_dir(self.run_id)

    def member_finished(self, member: Member, cause: str | None) -> None:
        """MEMBER's steps ended (done, failed, or never started): release whatever other members wait for from it."""
        if self.fan_out is not None:
            self.fan_out.stopped(member.id, f"it failed: {cause or 'it stopped before it'}")
        if self.ray is not None:
            self.ray.member_finished(member, cause)

    @cached_property
    def fan_out(self) -> FanOut | None:
        """Who serves whom for each tree, unless every tree goes directly from here."""
        if self.plan.fan_out == DIRECT or not self.plan.cluster.factories:
            return None
        trees = [tree.remote_directory for tree in [*self.plan.resources, *self.plan.extension_trees]]
        members = [member.id for member in self.plan.cluster.members]
        modes = tree_modes(self.plan.fan_out, {tree: self.local_trees[tree].size for tree in trees}, len(members),
                           self.uplink, self.notes)
        return FanOut(members, modes, writes_stopped=self.writes_stopped)

    @cached_property
    def private_addresses(self) -> list[str]:
        return [member.private_ip for member in self.plan.cluster.members]

    @cached_property
    def members_known_hosts(self) -> bytes:
        pinned = read_known_hosts(self.plan.host_keys.known_hosts)
        return members_known_hosts({member.private_ip: keys_in(pinned, self.plan.address(member))
                                    for member in self.plan.cluster.members})

    @cached_property
    def runner_library(self) -> Resource:
        """This machine's flambe_iac package, for the runner on the orchestrator: the same version, always."""
        return Resource("flambe_iac", Path(flambe_iac.__file__).parent, parent=RUNNER_LIBRARY,
                        excludes=("__pycache__",))

    def prepare_trees(self) -> None:
        """Walk and hash every tree once, before any host's steps start: they all compare against these."""
        _ = self.local_trees, self.resource_checksums

    @cached_property
    def local_trees(self) -> dict[str, LocalTree]:
        """Every tree as the input checks walked it, and the runner library."""
        runner = [self.runner_library] if self.plan.request.run else []
        trees = [*self.plan.resources, *self.plan.extension_trees, *runner]
        threads = gevent.get_hub().threadpool  # off the event loop: the lock's heartbeats beat through a long walk
        return {tree.remote_directory: self.plan.local_trees.get(tree.remote_directory)
                or threads.apply(walk_tree, (tree.path, tree.excludes)) for tree in trees}

    @cached_property
    def resource_checksums(self) -> dict[str, dict[str, str]]:
        """sha256 of every resource file that the local cache does not hold as it is now, several files at once in
        OS threads (hashlib lets go of the GIL): the event loop, and with it every deploy lock's heartbeat, runs on
        through tens of gigabytes. The files are those the walk found (`local_trees`)."""
        threads = gevent.get_hub().threadpool
        cache = ChecksumCache()
        return {resource.name: checksums(resource, self.local_trees[resource.remote_directory], cache,
                                         in_thread=threads.apply, hash_files=threads.map)
                for resource in self.plan.resources}

    @cached_property
    def recorded_checksums(self) -> dict[str, dict[str, str]]:
        """What the manifest records, for `status` to check: every resource file's sha256, an S3 resource's where
        its listing has one (an object checked by its MD5 is left out: no sha256 of it is known here)."""
        s3 = {name: {item.path: item.checksum for item in listing.objects if item.algorithm == "sha256"}
              for name, listing in self.plan.s3_listings.items()}
        return {**self.resource_checksums, **s3}

    def manifest_for(self, member: Member) -> bytes:
        if member.id not in self.manifests:
            members = [{"id": other.id, "role": other.role, "private_ip": other.private_ip}
                       for other in self.plan.cluster.members]
            self.manifests[member.id] = manifest_content(
                self.plan.cluster.name, member.role, member.id, members, self.key.fingerprint, self.recorded_checksums,
                __version__, extension_sources(self.plan))
        return self.manifests[member.id]

    def manifest_vouches(self, member: Member, snapshot: HostSnapshot) -> bool:
        """The host's manifest is the one this run would write: the run that wrote it checked the host's copies
        against these very checksums (a manifest is written only once every step of its run succeeded)."""
        recorded = snapshot.files.get(MANIFEST)
        return recorded is not None and recorded[1] == hashlib.sha256(self.manifest_for(member)).hexdigest()


def extension_sources(plan: DeployPlan) -> dict[str, dict]:
    """Where each extension came from and, for git, the exact commit: for the report and the manifest."""
    return {checkout.location.name: {"kind": checkout.location.kind, "location": redact_url(checkout.location.text),
                                     "commit": checkout.commit} for checkout in plan.extensions}
