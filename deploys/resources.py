"""Resources, rsynced into ~/resources/NAME/ with delta transfer and --delete."""

from __future__ import annotations

from flambe_iac.deploys.operations import synced_trees
from flambe_iac.deploys.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.engine.remote_layout import MANIFEST


def reads(context) -> SnapshotRequest:
    """The copies' listings, and the manifest's sha256: whether it vouches for their checksums."""
    return SnapshotRequest(trees=tuple(tree.remote_directory for tree in context.plan.resources), files=(MANIFEST,),
                           tools=("rsync", "find", "sort", "sha256sum", "base64"))


def sync_resources(context, member, snapshot: HostSnapshot) -> list:
    transfers = context.transfers(member, context.plan.resources, vouched=context.manifest_vouches(member, snapshot))
    return synced_trees(transfers, context.causes, context.notes, snapshot)
