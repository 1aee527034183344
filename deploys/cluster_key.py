"""The cluster's own key pair, and everything host-to-host SSH needs: authorized key, pinned member keys, config."""

from __future__ import annotations

from functools import partial

from pyinfra.api import deploy

from flambe_iac.secrets_file import HiddenBytes

from flambe_iac.deploys.operations import edited_file, staged_file
from flambe_iac.keys import ClusterKey
from flambe_iac.remote_layout import (
    AUTHORIZED_KEYS,
    CLUSTER_PRIVATE_KEY,
    CLUSTER_PUBLIC_KEY,
    MEMBERS_KNOWN_HOSTS,
    SSH_CONFIG,
    ssh_config_block,
    updated_authorized_keys,
    updated_ssh_config,
)


@deploy("cluster key")
def install_cluster_key(cluster_name: str, ssh_user: str, key: ClusterKey, members_known_hosts: bytes,
                        private_addresses: list[str], retired_keys: list[str]) -> list:
    block = ssh_config_block(cluster_name, ssh_user, private_addresses)
    return [
        staged_file(name="cluster private key", path=CLUSTER_PRIVATE_KEY,
                    content=HiddenBytes(key.private_openssh),
                    mode="600"),
        staged_file(name="cluster public key", path=CLUSTER_PUBLIC_KEY,
                    content=HiddenBytes(key.public_line.encode() + b"\n"), mode="644"),
        edited_file(name="authorized cluster key", path=AUTHORIZED_KEYS, mode="600",
                    edit=partial(updated_authorized_keys, public_line=key.public_line,
                                 cluster_name=cluster_name, retired_keys=retired_keys)),
        staged_file(name="members' host keys", path=MEMBERS_KNOWN_HOSTS,
                    content=HiddenBytes(members_known_hosts),
                    mode="644"),
        edited_file(name="ssh config block", path=SSH_CONFIG, mode="600",
                    edit=partial(updated_ssh_config, block=block, cluster_name=cluster_name)),
    ]
