"""What every day-two command needs: the cluster, its members' aliases, and how to reach each one.

Each command takes the deploy's cluster sources and SSH policy (only your key, pinned host keys, no agent, an
optional --jump host) and starts OpenSSH's own ssh and rsync, formed by the SSH policy, one per host, all at once.
Hosts are named as SkyPilot and Ray users expect: CLUSTER-orchestrator, CLUSTER-factory-0, CLUSTER-factory-1, ...
"""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from flambe_iac.cluster import ORCHESTRATOR, Cluster, Host
from flambe_iac.inputs.plan import DeployRequest, access_parts, ssh_policy
from flambe_iac.ssh.policy import SshPolicy, SshTarget, parse_jump, ssh_command_line
from flambe_iac.terminal import safe_line

ROLES = ("all", "orchestrator", "factories")


@dataclass(frozen=True)
class Access:
    """A cluster and how to reach its members."""

    cluster: Cluster
    policy: SshPolicy
    address_kind: str

    def alias(self, member: Host) -> str:
        if member.role == ORCHESTRATOR:
            return f"{self.cluster.name}-orchestrator"
        return f"{self.cluster.name}-factory-{self.cluster.factories.index(member)}"

    def target(self, member: Host) -> SshTarget:
        return self.policy.target(member.address(self.address_kind))

    def chosen(self, role: str) -> list[Host]:
        if role == "orchestrator":
            return [self.cluster.orchestrator]
        if role == "factories":
            return list(self.cluster.factories)
        return list(self.cluster.members)

    def ssh_argv(self, member: Host, command: str) -> list[str]:
        return ssh_command_line(self.target(member), command)


def load_access(arguments) -> Access:
    """The cluster and the SSH policy, read and checked as the deploy reads them, and nothing else a deploy reads
    (no secrets, resources or runnable)."""
    request = DeployRequest.from_arguments(arguments)
    cluster, user_key, host_keys, _ = access_parts(request)
    return Access(cluster, ssh_policy(cluster, user_key, host_keys, request, parse_jump(request.jump)),
                  request.address_kind)


class PrefixedOutput:
    """Lines from many hosts at once, each whole, prefixed with its host's alias, its control characters escaped.
    A line that CONSUMES(alias, line) takes is not shown."""

    def __init__(self, consumes=lambda alias, line: False):
        self.lock = threading.Lock()
        self.consumes = consumes

    def pump(self, stream, alias: str, to) -> None:
        for line in iter(stream.readline, b""):
            with self.lock:
                if not self.consumes(alias, line):
                    to.write(f"{alias}: {safe_line(line)}\n")
                    to.flush()


def run_everywhere(access: Access, members: list[Host], argv_for, consumes=lambda alias, line: False) -> dict[str, int]:
    """ARGV_FOR(member) on every member at once; their output prefixed; {alias: exit code}."""
    output = PrefixedOutput(consumes)

    def run(member: Host) -> int:
        alias = access.alias(member)
        process = subprocess.Popen(argv_for(member), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=access.policy.environment())
        pumps = [threading.Thread(target=output.pump, args=(process.stdout, alias, sys.stdout)),
                 threading.Thread(target=output.pump, args=(process.stderr, alias, sys.stderr))]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        return process.wait()

    with ThreadPoolExecutor(max_workers=max(1, len(members))) as pool:
        codes = list(pool.map(run, members))
    return {access.alias(member): code for member, code in zip(members, codes)}
