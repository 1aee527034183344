"""Day two without costing running machines: the factories are launches, each one instant fleet that never changes.

An instant fleet cannot grow or shrink. So a larger flambe:factoryCount adds one launch for the difference, pinned to
the type, zone and market the cluster already has; a smaller one removes whole launches, newest first (deleting a
launch's fleet terminates its instances), and a count that falls inside a launch is refused at preview with the
two counts that would work. What EC2 holds is the record (DescribeFleets and DescribeInstances, read-only): a
factory that is gone (terminated by hand, a spot reclaim) leaves its launch short, and the next `pulumi up` adds a
launch for what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flambe_iac.aws.fleets import fleet_records, live_ids
from flambe_iac.stacks.cluster_config import NAMESPACE, StackConfigError

LAUNCH_TAG, FLEET_TAG, ATTEMPT_TAG = "flambe-launch", "flambe-fleet", "flambe-attempt"


@dataclass
class Launch:
    """One launch of factories: its index, its attempt, and the fleets (by resource name) that hold its live
    members, each member (instance id, type, subnet, zone, lifecycle)."""
    index: int
    attempt: int
    fleets: dict[str, list[tuple[str, str, str, str, str]]] = field(default_factory=dict)

    @property
    def live(self) -> list[tuple[str, str, str, str, str]]:
        return [item for members in self.fleets.values() for item in members]


@dataclass
class Plan:
    kept: list[Launch]  # launches that stay as they are
    new_index: int | None  # the launch to add, if any
    new_attempt: int
    new_count: int


def small_number(text: str | None) -> int | None:
    return int(text) if text and text.isascii() and text.isdigit() and len(text) < 7 else None


def history(ec2, cluster: str, default_fleet: str) -> tuple[list[Launch], dict[int, int]]:
    """(launches that hold live factories, by index; {index: last attempt} of launches whose last attempt never
    launched anything, so the next run asks EC2 again with the next attempt)."""
    records = fleet_records(ec2, cluster, "factory")
    listed = {record["FleetId"]: [(instance_id, str(entry.get("InstanceType", "")),
                                   str(entry.get("Lifecycle", "on-demand")))
                                  for entry in record.get("Instances") or []
                                  for instance_id in entry.get("InstanceIds") or []] for record in records}
    alive = live_ids(ec2, [item[0] for items in listed.values() for item in items])
    members = {fleet_id: [(instance_id, kind, *alive.get(instance_id, ("", "")), lifecycle)
                          for instance_id, kind, lifecycle in items] for fleet_id, items in listed.items()}
    by_index: dict[int, dict[int, list[dict]]] = {}
    for record in records:
        index = small_number(record["tags"].get(LAUNCH_TAG)) or 0
        attempt = small_number(record["tags"].get(ATTEMPT_TAG)) or 1
        by_index.setdefault(index, {}).setdefault(attempt, []).append(record)
    launches, pending = [], {}
    for index, attempts in sorted(by_index.items()):
        last = max(attempts)
        launch = Launch(index, last)
        for record in attempts[last]:
            held = [item for item in members[record["FleetId"]] if item[0] in alive]
            if held:
                launch.fleets[record["tags"].get(FLEET_TAG) or default_fleet] = held
        if launch.fleets:
            launches.append(launch)
        elif not any(listed[record["FleetId"]] for record in attempts[last]):
            pending[index] = last  # it never launched: ask again
    return launches, pending


def plan(count: int, launches: list[Launch], pending: dict[int, int]) -> Plan:
    """Keep launches in order while they fit COUNT; drop whole newest ones beyond it; add one launch for the rest."""
    kept = list(launches)
    total = sum(len(launch.live) for launch in kept)
    while kept and total > count:
        dropped = kept.pop()
        total -= len(dropped.live)
        if total < count:
            raise StackConfigError(
                f"{NAMESPACE}:factoryCount {count} falls inside launch {dropped.index}, whose "
                f"{len(dropped.live)} factories ({', '.join(item[0] for item in dropped.live)}) EC2 launched "
                f"together, and an instant fleet cannot shrink: flambe-iac removes whole launches, newest first. "
                f"Choose pulumi config set {NAMESPACE}:factoryCount {total} (removes that launch) or "
                f"pulumi config set {NAMESPACE}:factoryCount {total + len(dropped.live)} (keeps it)")
    if total >= count:
        return Plan(kept, None, 0, 0)
    if pending:
        index = max(pending)
        return Plan(kept, index, pending[index] + 1, count - total)
    index = max((launch.index for launch in launches), default=-1) + 1
    return Plan(kept, index, 1, count - total)
