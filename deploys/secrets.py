"""The secrets ini, byte-identical and 0600 on every host, written atomically."""

from __future__ import annotations

from flambe_iac.deploys.operations import staged_files
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.remote_layout import SECRETS

READS = SnapshotRequest(files=(SECRETS,), tools=("tar",))  # its mode and digest only: never its contents


def push_secrets(context, member, snapshot: HostSnapshot) -> list:
    return [staged_files(name="secrets file", files=[(SECRETS, context.plan.secrets, "600")], snapshot=snapshot,
                         staging=context.staging, causes=context.causes)]
