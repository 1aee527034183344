"""Resources, rsynced into ~/resources/NAME/ with delta transfer and --delete."""

from __future__ import annotations

from pyinfra.api import deploy

from flambe_iac.deploys.facts import HostSnapshot
from flambe_iac.deploys.operations import synced_trees
from flambe_iac.ssh_options import RsyncJob


@deploy("resources")
def sync_resources(transfers: list[tuple[str, set, RsyncJob]], failures: dict, snapshot: HostSnapshot) -> list:
    """TRANSFERS: (remote directory, expected tree, rsync job) for each resource."""
    return synced_trees(transfers, failures, snapshot)
