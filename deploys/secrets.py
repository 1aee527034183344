"""The secrets ini, byte-identical and 0600 on every host, written atomically."""

from __future__ import annotations

from pyinfra.api import deploy

from flambe_iac.secrets_file import HiddenBytes

from flambe_iac.deploys.operations import staged_file
from flambe_iac.remote_layout import SECRETS


@deploy("secrets")
def push_secrets(content: HiddenBytes) -> list:
    return [staged_file(name="secrets file", path=SECRETS, content=content, mode="600")]
