"""The one set of OpenSSH client options for every process we start that speaks SSH (rsync's ssh included).

Exactly the given key (IdentitiesOnly, no agent, no forwarding), no user ssh config, and host keys checked
against the pinned file only.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SshTarget:
    address: str
    user: str
    key: Path
    known_hosts: Path
    connect_timeout: int = 10
    batch_mode: bool = True  # off only when an askpass helper must supply the key's passphrase


def ssh_options(target: SshTarget) -> list[str]:
    options = [
        "-F", "/dev/null",
        "-i", str(target.key),
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "ForwardAgent=no",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={target.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"ConnectTimeout={target.connect_timeout}",
    ]
    if target.batch_mode:
        options += ["-o", "BatchMode=yes"]
    return options


@dataclass(frozen=True)
class RsyncJob:
    argv: list[str]
    environment: dict[str, str] | None = field(default=None, repr=False)  # may carry the key's passphrase


ASKPASS_SCRIPT = '#!/bin/sh\nprintf "%s\\n" "$FLAMBE_KEY_PASSPHRASE"\n'


def askpass_environment(helper: Path, passphrase: str) -> dict[str, str]:
    """What lets ssh unlock an encrypted key without a terminal or an agent: the passphrase stays in the
    environment of our own ssh process, never on a command line or on disk."""
    return {**os.environ, "SSH_ASKPASS": str(helper), "SSH_ASKPASS_REQUIRE": "force",
            "FLAMBE_KEY_PASSPHRASE": passphrase}


def rsync_command(source: str, destination: str, target: SshTarget, delete: bool = True,
                  excludes: tuple[str, ...] = ()) -> list[str]:
    """rsync with delta transfer into DESTINATION (relative to the remote home), over our ssh options.

    --protect-args keeps the remote path away from the remote shell; the remote side first makes
    DESTINATION's parent, since rsync makes only the last directory of a path.
    """
    remote_shell = shlex.join(["ssh", *ssh_options(target)])
    parent = posixpath.dirname(destination.rstrip("/")) or "."
    command = ["rsync", "--archive", "--protect-args", "--rsh", remote_shell,
               "--rsync-path", f"mkdir -p {shlex.quote(parent)} && rsync"]
    if delete:
        command.append("--delete")
    command += [f"--exclude={name}" for name in excludes]
    return [*command, "--", source, f"{target.user}@{target.address}:{destination}"]
