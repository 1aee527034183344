"""Day two without costing running machines: the factories are launches, each one instant fleet that never changes.

An instant fleet cannot grow or shrink. So a larger flambe:factoryCount adds one launch for the difference, pinned to
the type, zone and market the cluster already has; a smaller one removes whole launches, newest first (deleting a
launch's fleet terminates its instances), and a count that falls inside a launch is refused at preview with the
two counts that would work. The cluster's live instances are the record (DescribeInstances by the cluster's tags;
each instance carries its launch, its fleet's resource name and its attempt, from its fleet's launch template): a
factory that is gone (terminated by hand, a spot reclaim) leaves its launch short, and the next `pulumi up` adds a
launch for what is missing. A launch no live instance shows gets a new attempt each run, so its fleet (empty, or
all of its instances gone) is replaced and EC2 asked again; a fleet that holds a live instance keeps its attempt.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

import pulumi

from flambe_iac.stacks.cluster_config import NAMESPACE, StackConfigError
from flambe_iac.terminal import safe_field

LAUNCH_TAG, FLEET_TAG, ATTEMPT_TAG = "flambe-launch", "flambe-fleet", "flambe-attempt"
STACK_TAG = "flambe-stack"  # the stack whose state holds the instance's fleet
ON_DEMAND_SUFFIX = "_on_demand"
ATTEMPT_FORM = re.compile(r"[0-9a-f]{1,16}")


class LaunchRecordError(pulumi.RunError):
    """A live instance of the cluster does not say which launch, fleet or attempt it belongs to: the program stops
    rather than declare its fleet wrong (a wrong name or attempt would delete or replace it, with the instance)."""


@dataclass
class Launch:
    """One launch of factories: its index, its attempt, and the fleets (by resource name) that hold its live
    members, each member (instance id, type, subnet, zone, lifecycle)."""
    index: int
    attempt: str
    fleets: dict[str, list[tuple[str, str, str, str, str]]] = field(default_factory=dict)

    @property
    def live(self) -> list[tuple[str, str, str, str, str]]:
        return [item for members in self.fleets.values() for item in members]


@dataclass
class Plan:
    kept: list[Launch]  # launches that stay as they are
    new_index: int | None  # the launch to add, if any
    new_count: int


def new_attempt() -> str:
    """An attempt no fleet had: a launch no live instance shows asks EC2 again each run."""
    return secrets.token_hex(4)


def fleet_name(cluster: str, index: int, on_demand: bool = False) -> str:
    """The resource name of launch INDEX's fleet (the on-demand one of a spot fallback with ON_DEMAND)."""
    return f"{cluster}_factories" + (f"_{index}" if index else "") + (ON_DEMAND_SUFFIX if on_demand else "")


def stack_identity() -> str:
    """This stack, as its instances' STACK_TAG names it: organization/project/stack ("organization": the name a
    self-managed backend gives, for an engine that names none)."""
    return f"{pulumi.get_organization() or 'organization'}/{pulumi.get_project()}/{pulumi.get_stack()}"


def marks_of(instance: dict, cluster: str, role: str, stack: str) -> tuple[int, str, str]:
    """(launch index, fleet name, attempt) an instance of ROLE carries, checked, launched by STACK; or a
    LaunchRecordError."""
    tags = instance["tags"]
    index_text, name, attempt, owner = (tags.get(key, "") for key in (LAUNCH_TAG, FLEET_TAG, ATTEMPT_TAG, STACK_TAG))
    if owner and owner != stack:
        raise another_stacks(instance["id"], cluster, role, owner, stack)
    index = int(index_text) if index_text.isascii() and index_text.isdigit() and len(index_text) < 5 else None
    if role == "orchestrator":
        index, names = 0, {f"{cluster}_orchestrator"}
    else:
        names = {fleet_name(cluster, index), fleet_name(cluster, index, on_demand=True)} if index is not None else set()
    if index is None or name not in names or not ATTEMPT_FORM.fullmatch(attempt) or not owner:
        raise LaunchRecordError(
            f"instance {safe_field(instance['id'])} is tagged as the {role} of cluster {cluster} but its tags "
            f"{LAUNCH_TAG}={safe_field(index_text[:20])!r}, {FLEET_TAG}={safe_field(name[:80])!r}, "
            f"{ATTEMPT_TAG}={safe_field(attempt[:20])!r}, {STACK_TAG}={safe_field(owner[:120])!r} do not name a launch "
            f"of it: the program stops rather than "
            f"declare its fleet wrong. A member an earlier flambe-iac launched as a single instance (before fleets) "
            f"cannot join a fleet: finish its work, pulumi destroy, then pulumi up with this version. If flambe-iac "
            f"did not launch it, remove its Cluster-Name tag: aws ec2 "
            f"delete-tags --resources {safe_field(instance['id'])} --tags Key=Cluster-Name")
    return index, name, attempt


def another_stacks(instance_id: str, cluster: str, role: str, owner: str, stack: str) -> LaunchRecordError:
    return LaunchRecordError(
        f"instance {safe_field(instance_id)} is tagged as the {role} of cluster {cluster}, launched by stack "
        f"{safe_field(owner[:120])!r}, not by this one ({stack}): its fleet is in that stack's state, and declaring "
        f"it here would launch it again, so the program stops. Two stacks in one account and region need two "
        f"cluster names: pulumi config set {NAMESPACE}:name ANOTHER-NAME. If this stack was renamed, retag its "
        f"instances: aws ec2 create-tags --resources {safe_field(instance_id)} --tags Key={STACK_TAG},Value={stack}")


def history(instances: list[dict], cluster: str, stack: str) -> list[Launch]:
    """The launches that hold live factories, by index, from the cluster's live factory instances (of STACK)."""
    launches: dict[int, Launch] = {}
    for item in sorted(instances, key=lambda found: (found["launched"], found["id"])):
        index, name, attempt = marks_of(item, cluster, "factory", stack)
        launch = launches.setdefault(index, Launch(index, attempt))
        if launch.attempt != attempt:
            raise LaunchRecordError(
                f"launch {index} of cluster {cluster} has live instances of two attempts ({launch.attempt} and "
                f"{attempt}; {safe_field(item['id'])}): one fleet per launch holds instances, so the program stops "
                f"rather than replace either; see aws ec2 describe-instances --filters "
                f"Name=tag:{LAUNCH_TAG},Values={index} Name=tag:Cluster-Name,Values={cluster}")
        launch.fleets.setdefault(name, []).append(
            (item["id"], item["type"], item["subnet"], item["zone"], item["lifecycle"]))
    return [launches[index] for index in sorted(launches)]


def held_attempt(instances: list[dict], cluster: str, role: str, stack: str) -> str:
    """The attempt of ROLE's one fleet while a live instance shows it, else a new one (EC2 is asked again)."""
    attempts = {marks_of(item, cluster, role, stack)[2] for item in instances}
    if len(attempts) > 1:
        raise LaunchRecordError(
            f"the {role} of cluster {cluster} has live instances of {len(attempts)} attempts "
            f"({', '.join(sorted(attempts))}): the program stops rather than replace any; see aws ec2 "
            f"describe-instances --filters Name=tag:Cluster-Name,Values={cluster} Name=tag:Role,Values={role}")
    return attempts.pop() if attempts else new_attempt()


def plan(count: int, launches: list[Launch]) -> Plan:
    """Keep launches in order while they fit COUNT; drop whole newest ones beyond it; add one launch for the rest,
    after the newest live one (its fleet's name may be one the state holds empty or dead: a new attempt replaces
    it)."""
    kept = list(launches)
    total = sum(len(launch.live) for launch in kept)
    while kept and total > count:
        dropped = kept.pop()
        total -= len(dropped.live)
        if total < count:
            raise StackConfigError(
                f"{NAMESPACE}:factoryCount {count} falls inside launch {dropped.index}, whose {len(dropped.live)} "
                f"factories ({safe_field(', '.join(item[0] for item in dropped.live))}) EC2 launched together, "
                f"and an instant fleet cannot shrink: flambe-iac removes whole launches, newest first. "
                f"Choose pulumi config set {NAMESPACE}:factoryCount {total} (removes that launch) or "
                f"pulumi config set {NAMESPACE}:factoryCount {total + len(dropped.live)} (keeps it)")
    if total >= count:
        return Plan(kept, None, 0)
    return Plan(kept, max((launch.index for launch in launches), default=-1) + 1, count - total)
