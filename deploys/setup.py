"""Setup commands (Flambé's `setup_cmds`, `--setup`): run in order on every host, through its login shell, after the
files are in place and before `--run`. A command that fails fails its host, with its exit code and last errors."""

from __future__ import annotations

import shlex

from pyinfra.api import operation

from flambe_iac.deploys.operations import host_function, ran
from flambe_iac.engine.snapshot import HostSnapshot

SETUP_TIMEOUT = 6 * 3600.0


def run_setup_commands(context, member, snapshot: HostSnapshot) -> list:
    return [setup_commands(name="setup commands", commands=context.plan.setup_commands, causes=context.causes,
                           details=context.details)]


@operation(is_idempotent=False)
def setup_commands(commands: list[str], causes: dict, details: dict):
    yield host_function(_run_in_order, commands, causes, details, causes=causes)


def _run_in_order(state, host, commands: list[str], causes: dict, details: dict) -> bool:
    outcomes = []
    for number, command in enumerate(commands, 1):
        login_shell = f'exec "${{SHELL:-/bin/sh}}" -l -c {shlex.quote(command)}'
        result = ran(host, login_shell, causes, f"setup command {number} of {len(commands)} ({command!r}) did not "
                     "finish", timeout=SETUP_TIMEOUT)
        if result is None:
            return False
        outcomes.append(f"{command!r} exited {result.exit_code}")
        if result.exit_code != 0:
            causes[host.name] = (f"setup command {number} of {len(commands)} ({command!r}) exited "
                                 f"{result.exit_code}: {result.reason}")
            details[host.name] = "; ".join(outcomes)
            return False
    details[host.name] = "; ".join(outcomes)
    return True
