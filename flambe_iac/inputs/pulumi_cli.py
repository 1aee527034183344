"""Every run of the pulumi CLI: `pulumi stack output` for --stack, `pulumi config` for check; one timeout and one
handling of failures and of output that is not JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from flambe_iac.cluster import Cluster
from flambe_iac.errors import InputError
from flambe_iac.inputs.outputs import MASKED, parse_outputs

PULUMI_TIMEOUT = 300


def stack_outputs_command(stack: str, directory: Path | None = None, show_secrets: bool = False) -> list[str]:
    return ["pulumi", "stack", "output", "--json", *(["--show-secrets"] if show_secrets else []), "--stack", stack,
            *(["--cwd", str(directory)] if directory else [])]


def stack_config_command(stack: str, directory: Path | None = None) -> list[str]:
    return ["pulumi", "config", "--json", "--stack", stack, *(["--cwd", str(directory)] if directory else [])]


def require_pulumi() -> None:
    if shutil.which("pulumi") is None:
        raise InputError(
            "--stack needs the pulumi CLI, which is not on PATH: install it (https://www.pulumi.com/docs/install/), "
            "or pass the outputs as a file with --outputs outputs.json"
        )


def pulumi_json(argv: list[str]) -> Any:
    """Run one pulumi command and return its JSON output, or raise an InputError naming the command."""
    require_pulumi()
    shown = " ".join(argv)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=PULUMI_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InputError(f"`{shown}` did not answer within {PULUMI_TIMEOUT} s") from None
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] or ["no error output"]
        raise InputError(f"`{shown}` failed ({result.returncode}): {detail[0]}")
    try:
        return json.loads(result.stdout)
    except (ValueError, RecursionError):
        raise InputError(f"`{shown}` did not print JSON") from None


def load_stack(stack: str, directory: Path | None = None) -> Cluster:
    return parse_outputs(stack_outputs_document(stack, directory), source=f"stack {stack!r}")


def stack_outputs_document(stack: str, directory: Path | None = None) -> Any:
    """The stack's outputs as JSON; secrets are shown only if some output is secret (Pulumi masks them otherwise)."""
    document = pulumi_json(stack_outputs_command(stack, directory))
    if MASKED in json.dumps(document):
        document = pulumi_json(stack_outputs_command(stack, directory, show_secrets=True))
    return document


def stack_config(stack: str, directory: Path | None = None) -> dict:
    """The stack's config, {key: value}, objects as objects."""
    raw = pulumi_json(stack_config_command(stack, directory))
    if not isinstance(raw, dict):
        raise InputError(f"`{' '.join(stack_config_command(stack))}` printed JSON that is not an object")
    return {key: entry.get("objectValue", entry.get("value")) if isinstance(entry, dict) else entry
            for key, entry in raw.items()}
