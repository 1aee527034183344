"""The secrets ini, byte-identical and 0600 on every host, written atomically."""

from __future__ import annotations

from pyinfra.api import deploy

from flambe_iac.deploys.facts import HostSnapshot
from flambe_iac.deploys.operations import staged_files
from flambe_iac.remote_layout import SECRETS
from flambe_iac.secrets_file import HiddenBytes


@deploy("secrets")
def push_secrets(content: HiddenBytes, snapshot: HostSnapshot) -> list:
    return [staged_files(name="secrets file", files=[(SECRETS, content, "600")], snapshot=snapshot)]
