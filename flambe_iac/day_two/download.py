"""`flambe-deploy download`: rsync a path back from each chosen host into DIR/ALIAS/."""

from __future__ import annotations

from pathlib import Path

from flambe_iac.cluster import Host
from flambe_iac.day_two.access import Access, run_everywhere
from flambe_iac.ssh.policy import rsync_pull_command


def download(access: Access, role: str, remote_path: str, local_dir: Path) -> dict[str, int]:
    def argv(member: Host) -> list[str]:
        destination = local_dir / access.alias(member)
        destination.mkdir(parents=True, exist_ok=True)
        return rsync_pull_command(remote_path, f"{destination}/", access.target(member))

    return run_everywhere(access, access.chosen(role), argv)
