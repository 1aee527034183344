"""The cluster's own key pair, and everything host-to-host SSH needs: authorized key, pinned member keys, config."""

from __future__ import annotations

from pyinfra.api import deploy

from flambe_iac.deploys.facts import HostSnapshot
from flambe_iac.deploys.operations import staged_files
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
from flambe_iac.secrets_file import HiddenBytes

# Files whose current contents the cluster key step edits rather than replaces.
EDITED_FILES = (AUTHORIZED_KEYS, SSH_CONFIG)


@deploy("cluster key")
def install_cluster_key(cluster_name: str, ssh_user: str, key: ClusterKey, members_known_hosts: bytes,
                        private_addresses: list[str], retired_keys: list[str], snapshot: HostSnapshot) -> list:
    authorized_keys = updated_authorized_keys(snapshot.contents.get(AUTHORIZED_KEYS) or b"", key.public_line,
                                              cluster_name, retired_keys)
    ssh_config = updated_ssh_config(snapshot.contents.get(SSH_CONFIG) or b"",
                                    ssh_config_block(cluster_name, ssh_user, private_addresses), cluster_name)
    files = [
        (CLUSTER_PRIVATE_KEY, HiddenBytes(key.private_openssh), "600"),
        (CLUSTER_PUBLIC_KEY, HiddenBytes(key.public_line.encode() + b"\n"), "644"),
        (AUTHORIZED_KEYS, HiddenBytes(authorized_keys), "600"),
        (MEMBERS_KNOWN_HOSTS, HiddenBytes(members_known_hosts), "644"),
        (SSH_CONFIG, HiddenBytes(ssh_config), "600"),
    ]
    return [staged_files(name="cluster key files", files=files, snapshot=snapshot)]
