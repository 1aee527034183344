"""Extensions: each one's files in ~/extensions/NAME/ (no .git), and with -i, installed with pip --user."""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand, deploy, operation

from flambe_iac.deploys.facts import HostSnapshot
from flambe_iac.deploys.operations import synced_trees
from flambe_iac.ssh_options import RsyncJob


@deploy("extensions")
def push_extensions(transfers: list[tuple[str, set, RsyncJob]], failures: dict, snapshot: HostSnapshot) -> list:
    """TRANSFERS: (remote directory, expected tree, rsync job) for each extension that has files."""
    return synced_trees(transfers, failures, snapshot)


@deploy("install")
def install_extensions(targets: list[str]) -> list:
    return [pip_install_user(name="pip install --user", targets=targets)]


@operation(is_idempotent=False)
def pip_install_user(targets: list[str]):
    """pip install --user: pushed extensions by path (./extensions/NAME), others as PyPI requirements.

    PIP_BREAK_SYSTEM_PACKAGES lets --user installs through on distributions that mark their Python as
    externally managed (Debian 12, Ubuntu 24.04); it leaves system packages alone.
    """
    yield StringCommand("PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet "
                        "--disable-pip-version-check " + " ".join(shlex.quote(target) for target in targets))
