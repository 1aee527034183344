"""Relay fan-out: every tree crosses the user's uplink once, to the orchestrator, which rsyncs it on to the factories
with the cluster key.

The hop runs on the orchestrator, over the cluster's own key and pinned host keys (~/.ssh/flambe_known_hosts),
strict host key checking, that key only, no agent: the same `ssh_options` as every connection we make. The user's
key never leaves this machine and no agent is forwarded. If the orchestrator cannot serve a tree (it is down, or its
own copy failed), each factory falls back to a direct transfer, and the report says so.

Why a star and not a tree of relays: the hops start once the orchestrator's copy is whole; with hops in parallel the
orchestrator's own link carries N x S for N factories and S bytes. The uplink carries S once. A tree would help once
N x S / orchestrator link > S / uplink, that is once N exceeds the ratio of the two links (about 100 for a 10 Gbit/s
instance behind a 100 Mbit/s uplink), far beyond the clusters this tool makes.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from gevent.event import AsyncResult
from gevent.lock import BoundedSemaphore

from flambe_iac.engine.remote_layout import CLUSTER_PRIVATE_KEY, MEMBERS_KNOWN_HOSTS
from flambe_iac.ssh.channel import RemoteCommandError, run_remote
from flambe_iac.ssh.policy import SshTarget, rsync_command

DIRECT, RELAY = "direct", "relay"
FAN_OUT_MODES = (DIRECT, RELAY)
# Hops at once on the orchestrator's one SSH connection: below sshd's default MaxSessions (10), leaving room for the
# deploy lock and the orchestrator's own commands.
PARALLEL_HOPS = 7
HOP_TIMEOUT = 6 * 3600.0


class Relay:
    """Which trees the orchestrator holds whole, for the factories waiting to take them from it."""

    def __init__(self, destinations: list[str]):
        self.orchestrator_host = None
        self.ready = {destination: AsyncResult() for destination in destinations}
        self.hops = BoundedSemaphore(PARALLEL_HOPS)

    def orchestrator_has(self, destination: str) -> None:
        self.ready[destination].set(None)

    def orchestrator_lacks(self, destination: str, cause: str) -> None:
        if not self.ready[destination].ready():
            self.ready[destination].set(cause)

    def orchestrator_stopped(self, cause: str) -> None:
        """The orchestrator will serve nothing more: whoever still waits falls back to a direct transfer."""
        for destination in self.ready:
            self.orchestrator_lacks(destination, cause)

    def wait_for(self, destination: str) -> str | None:
        """None once the orchestrator holds DESTINATION whole; else why it never will."""
        return self.ready[destination].get()

    def hop(self, destination: str, user: str, address: str, connect_timeout: int) -> tuple[int, str]:
        """rsync DESTINATION from the orchestrator to the factory at ADDRESS: (rsync's exit code, its errors)."""
        target = SshTarget(address=address, user=user, key=Path(CLUSTER_PRIVATE_KEY),
                           known_hosts=Path(MEMBERS_KNOWN_HOSTS), connect_timeout=connect_timeout)
        command = shlex.join(rsync_command(f"{destination}/", f"{destination}/", target))
        with self.hops:
            try:
                result = run_remote(self.orchestrator_host, command, timeout=HOP_TIMEOUT)
            except RemoteCommandError as error:
                return 255, f"the connection to the orchestrator failed: {error}"
        return result.exit_code, result.stderr.decode(errors="replace")
