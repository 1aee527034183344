"""`flambe-deploy exec`: a command through each chosen host's login shell, all at once, output prefixed by host."""

from __future__ import annotations

import shlex

from flambe_iac.day_two.access import Access, run_everywhere


def exec_command(access: Access, role: str, command: list[str]) -> dict[str, int]:
    remote = shlex.join(command)
    return run_everywhere(access, access.chosen(role), lambda member: access.ssh_argv(member, remote))
