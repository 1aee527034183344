"""--autostop MINUTES: the agent on every member (this flambe_iac as one zip and the agent's settings, in the same
upload as any staged file, then `install`: the sudo check, the crontab's @reboot line, the agent restarted);
--autostop off: `remove`, which leaves nothing behind."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shlex
import zipfile
from pathlib import Path

from pyinfra.api import operation

import flambe_iac
from flambe_iac.agent.records import (
    AGENT_ARCHIVE,
    AGENT_CONFIG,
    AGENT_ENVIRONMENT,
    AGENT_LOG,
    AGENT_PROCESS,
    AGENT_STATE,
    PREEMPTED_DIR,
    AgentConfig,
)
from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.deploys.operations import host_function, ran, staged_files
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.engine.ray_cluster import stop_command
from flambe_iac.inputs.secrets_file import HiddenBytes

AGENT_TIMEOUT = 120.0
OFF = "off"
AGENTS_SEEN = SnapshotRequest(processes=(AGENT_PROCESS,))  # read on every deploy: see settlement.uncovered_members
LEFT_BY_AN_INSTALL = (AGENT_CONFIG, AGENT_ARCHIVE, AGENT_STATE, AGENT_LOG)  # any one: `off` has work to do


def reads(context) -> SnapshotRequest:
    installing = context.plan.autostop != OFF
    return SnapshotRequest(files=LEFT_BY_AN_INSTALL, tools=("python3", "crontab") if installing else (),
                           trees=() if installing else (PREEMPTED_DIR,), processes=(AGENT_PROCESS,))


def autostop_step(context, member, snapshot: HostSnapshot) -> list:
    """Nothing to do when the agent runs with these settings and this flambe_iac (or, for off, when nothing of it is
    left: an agent that died, or an install refused after its @reboot line was added, still leaves files)."""
    running = AGENT_PROCESS in snapshot.running
    archive = agent_archive()
    if context.plan.autostop == OFF:
        if not running and not any(name in snapshot.files for name in LEFT_BY_AN_INSTALL) \
                and PREEMPTED_DIR not in snapshot.trees:
            return []
        files = [(AGENT_ARCHIVE, HiddenBytes(archive), "644")]  # `remove` runs from it, whatever is there now
        return [staged_files(name="the autostop agent's code", files=files, snapshot=snapshot,
                             staging=context.staging, causes=context.causes),
                agent_command(name="remove the autostop agent", action="remove", causes=context.causes,
                              details=context.details)]
    files = [(AGENT_CONFIG, HiddenBytes(agent_config(context.plan, member).to_bytes()), "644"),
             (AGENT_ARCHIVE, HiddenBytes(archive), "644")]
    if running and all(snapshot.matches(path, mode, hashlib.sha256(content.data).hexdigest())
                       for path, content, mode in files):
        return []
    return [
        staged_files(name="the autostop agent and its settings", files=files, snapshot=snapshot,
                     staging=context.staging, causes=context.causes),
        agent_command(name="start the autostop agent", action="install", causes=context.causes,
                      details=context.details),
    ]


@functools.cache
def agent_archive() -> bytes:
    """This flambe_iac's Python files as one zip, the same bytes for the same code (sorted, with fixed times), so
    an unchanged agent is never sent again. The agent imports from it (zipimport: nothing is written beside it)."""
    package = Path(flambe_iac.__file__).parent
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for root, directories, names in os.walk(package):
            directories[:] = sorted(name for name in directories if name != "__pycache__")
            for name in sorted(name for name in names if name.endswith(".py")):
                path = Path(root, name)
                entry = zipfile.ZipInfo(f"flambe_iac/{path.relative_to(package).as_posix()}", (1980, 1, 1, 0, 0, 0))
                entry.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(entry, path.read_bytes())
    return buffer.getvalue()


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
    yield host_function(_agent_command, action, causes, details, causes=causes)


def _agent_command(state, host, action: str, causes: dict, details: dict) -> bool:
    command = f"cd && {AGENT_ENVIRONMENT} exec python3 -m flambe_iac.agent {shlex.quote(action)}"
    result = ran(host, command, causes, f"autostop {action} did not finish", f"autostop {action} failed",
                 timeout=AGENT_TIMEOUT)
    if result is None:
        return False
    details[host.name] = result.stdout.decode(errors="replace").strip()[-200:]
    return True
