"""Resources, rsynced into ~/resources/NAME/ with delta transfer and --delete."""

from __future__ import annotations

from pyinfra.api import deploy

from flambe_iac.deploys.operations import synced_tree


@deploy("resources")
def sync_resources(transfers: list[tuple[str, set, list[str]]], failures: dict) -> list:
    """TRANSFERS: (remote directory, expected tree, rsync argv) for each resource."""
    return [
        synced_tree(name=f"resource {destination}", destination=destination, expected=expected,
                    rsync_argv=rsync_argv, failures=failures)
        for destination, expected, rsync_argv in transfers
    ]
