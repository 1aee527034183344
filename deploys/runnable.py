"""Start the runnable on the orchestrator, detached so it outlives the SSH session, logging to ~/.flambe/run.log."""

from __future__ import annotations

import json
import shlex

from pyinfra.api import StringCommand, operation

from flambe_iac import __version__
from flambe_iac.deploys.operations import staged_files, synced_tree, transfers
from flambe_iac.deploys.ray import wait_for_workers
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.engine.ray_cluster import runner_environment
from flambe_iac.remote_layout import (
    LIBRARY_ENVIRONMENT,
    RESOURCES_DIR,
    RUN_EXIT,
    RUN_LOG,
    RUN_PID,
    RUN_PLAN,
    RUNNER_LIBRARY,
    SECRETS,
)
from flambe_iac.engine.remote_probes import RUNNABLE_RUNNING
from flambe_iac.inputs.secrets_file import HiddenBytes
from flambe_iac.ssh.channel import ANSWER_TIMEOUT


def reads(context) -> SnapshotRequest:
    return SnapshotRequest(files=(RUN_PLAN,), trees=(context.runner_library.remote_directory,),
                           tools=("rsync", "tar"))


def launch_runnable(context, member, snapshot: HostSnapshot) -> list:
    [library] = transfers(context, member, [context.runner_library], relayed=False)
    ray_cluster = context.ray
    waits = [wait_for_workers(name="wait for the Ray workers", ray=ray_cluster, causes=context.causes)] \
        if ray_cluster is not None else []
    return [
        synced_tree(name="flambe_iac for the runner", transfer=library, causes=context.causes, notes=context.notes,
                    snapshot=snapshot),
        staged_files(name="run plan", files=[(RUN_PLAN, HiddenBytes(run_plan(context.plan)), "644")], snapshot=snapshot,
                     staging=context.staging, causes=context.causes),
        *waits,
        detached_run(name="start the runnable", force=context.plan.request.force,
                     python=ray_cluster.python if ray_cluster is not None else "python3",
                     environment=runner_environment(ray_cluster.head_address) if ray_cluster is not None else {},
                     _timeout=int(ANSWER_TIMEOUT)),  # a start takes milliseconds; a host that never answers fails
    ]


@operation(is_idempotent=False)
def detached_run(force: bool, python: str, environment: dict[str, str]):
    """Refuse while an earlier run lives (unless FORCE, which stops it first); then start the runner in a
    session of its own (setsid), its output in the log, its pid in the pid file. With Ray, PYTHON is the
    Ray Python and ENVIRONMENT names the cluster, so a plain ray.init() joins it."""
    if force:
        on_running = 'kill -TERM "-$pid" 2>/dev/null; sleep 1; kill -KILL "-$pid" 2>/dev/null; true'
    else:
        on_running = ('echo "a runnable is already running on the orchestrator (pid $pid): wait for it, '
                      'or pass --force to stop it and start this one" >&2; exit 3')
    exports = "".join(f"{name}={shlex.quote(value)} " for name, value in environment.items())
    runner = (f'{exports}{LIBRARY_ENVIRONMENT} {shlex.quote(python)} -m flambe_iac.runnable {RUN_PLAN}; '
              f"echo $? > {RUN_EXIT}")
    yield StringCommand(
        f"if {RUNNABLE_RUNNING}; then {on_running}; fi; rm -f {RUN_EXIT}; "
        f"setsid nohup sh -c {shlex.quote(runner)} > {RUN_LOG} 2>&1 < /dev/null & echo $! > {RUN_PID}"
    )


def run_plan(plan) -> bytes:
    """~/.flambe/run.json: what the runner runs, with paths relative to the home directory. No secret in it."""
    document = {
        "runnable": plan.runnable.runnable,
        "args": plan.runnable.args,
        "resources": {name: f"{RESOURCES_DIR}/{name}" for name in plan.runnable.resources},
        "secrets": SECRETS,
        "import_paths": [RUNNER_LIBRARY] + [tree.remote_directory for tree in plan.extension_trees],
        "flambe_iac_version": __version__,
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
