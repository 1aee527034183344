"""~/.flambe/cluster.json: the cluster this host belongs to, its role, the key fingerprint and resource checksums."""

from __future__ import annotations

from pyinfra.api import deploy

from flambe_iac.secrets_file import HiddenBytes

from flambe_iac.deploys.operations import staged_file
from flambe_iac.remote_layout import MANIFEST


@deploy("manifest")
def write_manifest(content: bytes) -> list:
    return [staged_file(name="cluster manifest", path=MANIFEST, content=HiddenBytes(content), mode="644")]
