"""--autostop MINUTES: the agent on every member (the pushed flambe_iac, its settings, then `install`: the sudo
check, the crontab's @reboot line, the agent restarted); --autostop off: `remove`, which leaves nothing behind."""

from __future__ import annotations

import hashlib
import shlex

from pyinfra.api import FunctionCommand, operation

from flambe_iac.agent.records import AGENT_CONFIG, AGENT_PROCESS, AgentConfig
from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.deploys.operations import staged_files, synced_tree
from flambe_iac.deploys.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.engine.ray_cluster import stop_command
from flambe_iac.engine.remote_layout import LIBRARY_ENVIRONMENT
from flambe_iac.inputs.secrets_file import HiddenBytes
from flambe_iac.ssh.channel import RemoteCommandError, run_remote

AGENT_TIMEOUT = 120.0
OFF = "off"


def reads(context) -> SnapshotRequest:
    installing = context.plan.autostop != OFF
    return SnapshotRequest(files=(AGENT_CONFIG,), trees=(context.runner_library.remote_directory,),
                           tools=("rsync", "python3", "crontab") if installing else (), processes=(AGENT_PROCESS,))


def autostop_step(context, member, snapshot: HostSnapshot) -> list:
    """Nothing to do when the agent runs with these settings and this flambe_iac (or, for off, is gone)."""
    running = AGENT_PROCESS in snapshot.running
    [library] = context.transfers(member, [context.runner_library], relayed=False)
    sync_library = synced_tree(name="flambe_iac for the agent", transfer=library, causes=context.causes,
                               notes=context.notes, snapshot=snapshot)
    if context.plan.autostop == OFF:
        if not running and AGENT_CONFIG not in snapshot.files:
            return []
        return [sync_library, agent_command(name="remove the autostop agent", action="remove",
                                            causes=context.causes, details=context.details)]
    settings = agent_config(context.plan, member).to_bytes()
    library_current = snapshot.trees.get(library.destination) == library.expected.summary
    if running and library_current and snapshot.matches(AGENT_CONFIG, "644", hashlib.sha256(settings).hexdigest()):
        return []
    return [
        sync_library,
        staged_files(name="autostop settings", files=[(AGENT_CONFIG, HiddenBytes(settings), "644")],
                     snapshot=snapshot, staging=context.staging, causes=context.causes),
        agent_command(name="start the autostop agent", action="install", causes=context.causes,
                      details=context.details),
    ]


def agent_config(plan, member) -> AgentConfig:
    cluster = plan.cluster
    orchestrator = member.role == ORCHESTRATOR
    return AgentConfig(
        minutes=float(plan.autostop), role=member.role, member_id=member.id, user=cluster.ssh_user,
        factories=tuple(factory.private_ip for factory in cluster.factories) if orchestrator else (),
        orchestrator=None if orchestrator else cluster.orchestrator.private_ip,
        gpu_percent=plan.request.autostop_gpu, cpu_cores=plan.request.autostop_cpu,
        ray_stop=stop_command(plan.ray_python) if plan.request.ray else None)


@operation(is_idempotent=False)
def agent_command(action: str, causes: dict, details: dict):
    yield FunctionCommand(_agent_command, (action, causes, details), {})


def _agent_command(state, host, action: str, causes: dict, details: dict) -> bool:
    command = f"cd && {LIBRARY_ENVIRONMENT} exec python3 -m flambe_iac.agent {shlex.quote(action)}"
    try:
        result = run_remote(host, command, timeout=AGENT_TIMEOUT)
    except RemoteCommandError as error:
        causes[host.name] = f"autostop {action} did not finish: {error}"
        return False
    if result.exit_code != 0:
        causes[host.name] = f"autostop {action} failed: {result.reason}"
        return False
    details[host.name] = result.stdout.decode(errors="replace").strip()[-200:]
    return True
