"""`flambe-deploy download`: a path rsynced back from each chosen host into DIR/ALIAS/, plain files and folders only."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from flambe_iac.cluster import Host
from flambe_iac.day_two.access import Access, run_everywhere
from flambe_iac.errors import InputError
from flambe_iac.ssh.policy import require_safe_rsync, rsync_pull_command

SKIPPED = b"skipping non-regular file"


def download(access: Access, role: str, remote_path: str, local_dir: Path) -> dict[str, int]:
    """Every chosen member's REMOTE_PATH into LOCAL_DIR/ALIAS/; {alias: rsync's exit code}. What a host sends is not
    trusted: symlinks, devices, FIFOs and sockets stay behind (counted, not shown one by one), and nothing arrives
    setuid, setgid, or writable by group or others."""
    require_safe_rsync()
    members = access.chosen(role)
    destinations = {access.alias(member): destination_for(local_dir, access.alias(member)) for member in members}
    skipped: Counter = Counter()

    def argv(member: Host) -> list[str]:
        return rsync_pull_command(remote_path, f"{destinations[access.alias(member)]}/", access.target(member))

    def consumes(alias: str, line: bytes) -> bool:
        if line.startswith(SKIPPED):
            skipped[alias] += 1
            return True
        return False

    codes = run_everywhere(access, members, argv, consumes)
    for alias, count in sorted(skipped.items()):
        print(f"{alias}: skipped {count} symlink(s), device(s), FIFO(s) or socket(s): only plain files and "
              "directories are downloaded", file=sys.stderr)
    return codes


def destination_for(local_dir: Path, alias: str) -> Path:
    """LOCAL_DIR/ALIAS, made 0700 if absent; refused if it is a symlink or not a directory (rsync would write
    through it)."""
    destination = local_dir / alias
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise InputError(f"--to: {destination} is a symlink or not a directory; remove it or choose another --to")
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    return destination
