"""`flambe-deploy ssh-config`: a Host block per member, printed, or written and Included from ~/.ssh/config once."""

from __future__ import annotations

import time
from pathlib import Path

from flambe_iac.day_two.access import Access
from flambe_iac.local_files import write_atomically
from flambe_iac.ssh.policy import printed_config_block

SSH_CONFIG_DIR = Path("~/.flambe/ssh")


def ssh_config_text(access: Access) -> str:
    """An ssh_config with a block per member, under the same policy as the deploy's own connections."""
    blocks = [f"# flambe cluster {access.cluster.name}: written by flambe-deploy ssh-config\n"]
    blocks += [printed_config_block(access.alias(member), access.target(member)) for member in access.cluster.members]
    return "\n".join(blocks)


def write_ssh_config(access: Access, text: str) -> tuple[Path, bool]:
    """Write the cluster's file under ~/.flambe/ssh/ and Include it from ~/.ssh/config once (a backup first; the
    user's lines untouched). Returns (the cluster's file, whether ~/.ssh/config changed)."""
    directory = SSH_CONFIG_DIR.expanduser()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cluster_file = directory / f"{access.cluster.name}.conf"
    write_atomically(cluster_file, text)
    user_config = Path("~/.ssh/config").expanduser()
    include = f"Include {cluster_file}\n"
    current = user_config.read_bytes() if user_config.exists() else b""
    if include.strip().encode() in (line.strip() for line in current.splitlines()):
        return cluster_file, False
    if current:
        write_atomically(user_config.with_name(f"config.flambe-backup-{time.strftime('%Y%m%dT%H%M%S')}"), current)
    user_config.parent.mkdir(mode=0o700, exist_ok=True)
    # Include goes first: after a Host line it would apply to that host only.
    write_atomically(user_config, include.encode() + current)
    return cluster_file, True
