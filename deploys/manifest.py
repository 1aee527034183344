"""~/.flambe/cluster.json: the cluster this host belongs to, its role, the key fingerprint and resource checksums."""

from __future__ import annotations

from flambe_iac.deploys.operations import staged_files
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.remote_layout import MANIFEST
from flambe_iac.inputs.secrets_file import HiddenBytes

READS = SnapshotRequest(files=(MANIFEST,), tools=("tar",))


def write_manifest(context, member, snapshot: HostSnapshot) -> list:
    return [staged_files(name="cluster manifest", files=[(MANIFEST, HiddenBytes(context.manifest_for(member)), "644")],
                         snapshot=snapshot, staging=context.staging, causes=context.causes)]
