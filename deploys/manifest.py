"""~/.flambe/cluster.json: the cluster this host belongs to, its role, the key fingerprint and resource checksums."""

from __future__ import annotations

from pyinfra.api import deploy

from flambe_iac.deploys.facts import HostSnapshot
from flambe_iac.deploys.operations import staged_files
from flambe_iac.remote_layout import MANIFEST
from flambe_iac.secrets_file import HiddenBytes


@deploy("manifest")
def write_manifest(content: bytes, snapshot: HostSnapshot) -> list:
    return [staged_files(name="cluster manifest", files=[(MANIFEST, HiddenBytes(content), "644")],
                         snapshot=snapshot)]
