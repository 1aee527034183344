"""Every input turned into one validated DeployPlan before anything connects: bad input sends nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flambe_iac.cluster import ADDRESS_KINDS, PRIVATE, PUBLIC, Cluster, Host
from flambe_iac.errors import InputError
from flambe_iac.host_keys import HostKeyPolicy, choose_host_key_policy
from flambe_iac.keys import UserKey, load_user_key
from flambe_iac.resources import Resource, parse_resources
from flambe_iac.secrets_file import HiddenBytes, read_secrets_file


@dataclass(frozen=True)
class ClusterSource:
    """Exactly one of the three ways to name the cluster."""

    outputs: Path | None = None
    stack: str | None = None
    cluster_file: Path | None = None


@dataclass(frozen=True)
class DeployPlan:
    cluster: Cluster
    address_kind: str
    user_key: UserKey
    host_keys: HostKeyPolicy
    secrets: HiddenBytes | None
    resources: list[Resource]
    rotate_cluster_key: bool = False
    connect_timeout: int = 10

    def address(self, host: Host) -> str:
        return host.address(self.address_kind)


def load_cluster(source: ClusterSource) -> tuple[Cluster, Path | None]:
    """The cluster, and the key its source names (only a cluster file names one)."""
    if source.outputs is not None:
        from flambe_iac.outputs import load_outputs

        return load_outputs(source.outputs), None
    if source.stack is not None:
        from flambe_iac.stack import load_stack

        return load_stack(source.stack), None
    from flambe_iac.cluster_file import load_cluster_file

    return load_cluster_file(source.cluster_file)


def build_plan(source: ClusterSource, key: Path | None, secrets: Path | None, resources: list[str],
               known_hosts: Path | None, trust_on_first_use: bool, address_kind: str = PUBLIC,
               rotate_cluster_key: bool = False, connect_timeout: int = 10) -> DeployPlan:
    cluster, key_from_source = load_cluster(source)
    key = key or key_from_source
    if key is None:
        raise InputError("no SSH key: give the private key of the cluster's key pair with --key PATH")
    addresses = connect_addresses(cluster, address_kind)
    return DeployPlan(
        cluster=cluster,
        address_kind=address_kind,
        user_key=load_user_key(key),
        host_keys=choose_host_key_policy(cluster.name, addresses, known_hosts, trust_on_first_use),
        secrets=HiddenBytes(read_secrets_file(secrets)) if secrets else None,
        resources=parse_resources(resources),
        rotate_cluster_key=rotate_cluster_key,
        connect_timeout=connect_timeout,
    )


def connect_addresses(cluster: Cluster, address_kind: str) -> list[str]:
    if address_kind not in ADDRESS_KINDS:
        raise InputError(f"--address must be one of {', '.join(ADDRESS_KINDS)}, not {address_kind!r}")
    without = [host.id for host in cluster.members if not host.address(address_kind)]
    if without:
        hint = " (use --address private from inside the network)" if address_kind == PUBLIC else ""
        raise InputError(f"no {address_kind} address for {', '.join(without)}{hint}")
    for kind in dict.fromkeys((address_kind, PRIVATE)):
        values = [host.address(kind) for host in cluster.members]
        if len(set(values)) != len(values):
            raise InputError(f"two hosts share a {kind} address; every member needs its own")
    return [host.address(address_kind) for host in cluster.members]
