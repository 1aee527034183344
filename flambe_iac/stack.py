"""Stack outputs straight from Pulumi: `pulumi stack output --json --show-secrets --stack NAME`."""

from __future__ import annotations

import json
import shutil
import subprocess

from flambe_iac.cluster import Cluster
from flambe_iac.errors import InputError
from flambe_iac.outputs import parse_outputs


def stack_outputs_command(stack: str) -> list[str]:
    return ["pulumi", "stack", "output", "--json", "--show-secrets", "--stack", stack]


def require_pulumi() -> None:
    if shutil.which("pulumi") is None:
        raise InputError(
            "--stack needs the pulumi CLI, which is not on PATH: install it (https://www.pulumi.com/docs/install/), "
            "or pass the outputs as a file with --outputs outputs.json"
        )


def load_stack(stack: str) -> Cluster:
    require_pulumi()
    try:
        result = subprocess.run(stack_outputs_command(stack), capture_output=True, text=True, timeout=300,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InputError(f"`pulumi stack output` for stack {stack!r} did not answer within 300 s") from None
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] or ["no error output"]
        raise InputError(f"`pulumi stack output --stack {stack}` failed ({result.returncode}): {detail[0]}")
    try:
        document = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise InputError(f"`pulumi stack output --stack {stack}` did not print JSON") from None
    return parse_outputs(document, source=f"stack {stack!r}")
