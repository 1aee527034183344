"""Extensions: each one's files in ~/extensions/NAME/ (no .git), and with -i, installed with pip --user."""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand, operation

from flambe_iac.deploys.operations import synced_trees, transfers
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest


def reads(context) -> SnapshotRequest:
    return SnapshotRequest(trees=tuple(tree.remote_directory for tree in context.plan.extension_trees),
                           tools=("rsync",))


def push_extensions(context, member, snapshot: HostSnapshot) -> list:
    return synced_trees(transfers(context, member, context.plan.extension_trees), context.causes, context.notes,
                        snapshot)


def install_extensions(context, member, snapshot: HostSnapshot) -> list:
    plan = context.plan
    targets = [f"./{tree.remote_directory}" for tree in plan.extension_trees] + plan.extension_requirements
    return [pip_install_user(name="pip install --user", targets=targets)]


@operation(is_idempotent=False)
def pip_install_user(targets: list[str]):
    """pip install --user: pushed extensions by path (./extensions/NAME), others as PyPI requirements.

    PIP_BREAK_SYSTEM_PACKAGES lets --user installs through on distributions that mark their Python as
    externally managed (Debian 12, Ubuntu 24.04); it leaves system packages alone.
    """
    yield StringCommand("PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet "
                        "--disable-pip-version-check " + " ".join(shlex.quote(target) for target in targets))
