"""Resources, rsynced into ~/resources/NAME/ with delta transfer and --delete."""

from __future__ import annotations

from flambe_iac.deploys.operations import synced_trees
from flambe_iac.deploys.snapshot import HostSnapshot, SnapshotRequest


def reads(context) -> SnapshotRequest:
    return SnapshotRequest(trees=tuple(tree.remote_directory for tree in context.plan.resources), tools=("rsync",))


def sync_resources(context, member, snapshot: HostSnapshot) -> list:
    return synced_trees(context.transfers(member, context.plan.resources), context.causes, context.notes, snapshot)
