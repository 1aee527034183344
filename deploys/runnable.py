"""Start the runnable on the orchestrator, detached so it outlives the SSH session, logging to ~/.flambe/run.log."""

from __future__ import annotations

from pyinfra.api import StringCommand, deploy, operation

from flambe_iac.deploys.facts import HostSnapshot
from flambe_iac.deploys.operations import staged_files, synced_tree
from flambe_iac.remote_layout import RUN_LOG, RUN_PID, RUN_PLAN, RUNNER_LIBRARY
from flambe_iac.secrets_file import HiddenBytes
from flambe_iac.ssh_options import RsyncJob


@deploy("run")
def launch_runnable(library: tuple[str, set, RsyncJob], run_plan: bytes, force: bool, failures: dict,
                    snapshot: HostSnapshot) -> list:
    destination, expected, rsync = library
    return [
        synced_tree(name="flambe_iac for the runner", destination=destination, expected=expected, rsync=rsync,
                    failures=failures, snapshot=snapshot),
        staged_files(name="run plan", files=[(RUN_PLAN, HiddenBytes(run_plan), "644")], snapshot=snapshot),
        detached_run(name="start the runnable", force=force),
    ]


@operation(is_idempotent=False)
def detached_run(force: bool):
    """Refuse while an earlier run lives (unless FORCE, which stops it first); then start the runner in a
    session of its own (setsid), its output in the log, its pid in the pid file."""
    running = (f'[ -f {RUN_PID} ] && pid=$(cat {RUN_PID}) && kill -0 "$pid" 2>/dev/null '
               f'&& grep -q flambe_iac.runnable "/proc/$pid/cmdline" 2>/dev/null')
    if force:
        on_running = 'kill -TERM "-$pid" 2>/dev/null; sleep 1; kill -KILL "-$pid" 2>/dev/null; true'
    else:
        on_running = ('echo "a runnable is already running on the orchestrator (pid $pid): wait for it, '
                      'or pass --force to stop it and start this one" >&2; exit 3')
    yield StringCommand(
        f"if {running}; then {on_running}; fi; "
        f'setsid nohup env PYTHONPATH="$HOME/{RUNNER_LIBRARY}" python3 -m flambe_iac.runnable {RUN_PLAN} '
        f"> {RUN_LOG} 2>&1 < /dev/null & echo $! > {RUN_PID}"
    )
