"""The cluster's own key pair, and everything host-to-host SSH needs: authorized key, pinned member keys, config,
and the list of retired keys that keeps a replaced key out for good."""

from __future__ import annotations

from flambe_iac.deploys.operations import staged_files
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.engine.cluster_key import retired_list, updated_authorized_keys
from flambe_iac.engine.departures import EXCERPTS as MANIFEST_MEMBERS
from flambe_iac.engine.ray_cluster import RAY_TOKEN
from flambe_iac.remote_layout import (
    AUTHORIZED_KEYS,
    CLUSTER_PRIVATE_KEY,
    CLUSTER_PUBLIC_KEY,
    MEMBERS_KNOWN_HOSTS,
    RETIRED_KEYS,
    SSH_CONFIG,
)
from flambe_iac.inputs.secrets_file import HiddenBytes
from flambe_iac.ssh.policy import ssh_config_block, updated_ssh_config

READS = SnapshotRequest(
    files=(CLUSTER_PRIVATE_KEY, CLUSTER_PUBLIC_KEY, AUTHORIZED_KEYS, MEMBERS_KNOWN_HOSTS, SSH_CONFIG, RETIRED_KEYS),
    contents=(CLUSTER_PUBLIC_KEY, AUTHORIZED_KEYS, SSH_CONFIG, RETIRED_KEYS, MEMBERS_KNOWN_HOSTS),
    links=(AUTHORIZED_KEYS,),
    tools=("tar",),
    excerpts=MANIFEST_MEMBERS,  # who the last run's members were: those gone from the source still hold the key
) | SnapshotRequest(files=(RAY_TOKEN,))  # whether they hold Ray's token too (its mode and digest, never its bytes)


def install_cluster_key(context, member, snapshot: HostSnapshot) -> list:
    plan, key = context.plan, context.key
    authorized_keys = updated_authorized_keys(snapshot.contents.get(AUTHORIZED_KEYS) or b"", key.public_line,
                                              plan.cluster.name, plan.user_key.public_key)
    ssh_config = updated_ssh_config(snapshot.contents.get(SSH_CONFIG) or b"",
                                    ssh_config_block(plan.cluster.name, plan.cluster.ssh_user,
                                                     context.private_addresses),
                                    plan.cluster.name)
    files = [
        (CLUSTER_PRIVATE_KEY, HiddenBytes(key.private_openssh), "600"),
        (CLUSTER_PUBLIC_KEY, HiddenBytes(key.public_line.encode() + b"\n"), "644"),
        # The retired list lands before authorized_keys: a run cut short between the two still keeps the old key out.
        (RETIRED_KEYS, HiddenBytes(retired_list(context.retired)), "644"),
        (AUTHORIZED_KEYS, HiddenBytes(authorized_keys), "600"),
        (MEMBERS_KNOWN_HOSTS, HiddenBytes(context.members_known_hosts), "644"),
        (SSH_CONFIG, HiddenBytes(ssh_config), "600"),
    ]
    return [staged_files(name="cluster key files", files=files, snapshot=snapshot, staging=context.staging,
                         causes=context.causes)]
