"""Resources, rsynced into ~/resources/NAME/ with delta transfer and --delete."""

from __future__ import annotations

from flambe_iac.deploys.operations import synced_trees, transfers
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.remote_layout import MANIFEST


def reads(context) -> SnapshotRequest:
    """The copies' listings, and the manifest: its sha256 (does it vouch for their checksums?), and its bytes (which
    files' checksums it records), read here rather than in a round trip of their own."""
    return SnapshotRequest(trees=tuple(tree.remote_directory for tree in context.plan.resources), files=(MANIFEST,),
                           contents=(MANIFEST,), tools=("rsync", "find", "sort", "sha256sum", "base64"))


def sync_resources(context, member, snapshot: HostSnapshot) -> list:
    copies = transfers(context, member, context.plan.resources, vouched=context.manifest_vouches(member, snapshot),
                       manifest=snapshot.contents.get(MANIFEST, b""))
    return synced_trees(copies, context.causes, context.notes, snapshot)
