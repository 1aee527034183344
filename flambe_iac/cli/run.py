"""flambe-run: run a runnable here, with the secrets as its `config`, as it will run on the orchestrator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flambe_iac import __version__
from flambe_iac.errors import EXIT_BAD_INPUT, EXIT_OK, InputError, exit_code_of
from flambe_iac.inputs.plan import load_runnable
from flambe_iac.inputs.resources import parse_resources
from flambe_iac.inputs.runnable_file import import_paths
from flambe_iac.inputs.secrets_file import read_secrets_file
from flambe_iac.runnable import RunnableError, run_runnable, secrets_config

DEFAULT_SECRETS = Path("~/.flambe/secrets.ini")

EPILOG = """\
the runnable file (YAML; an optional first document of extensions, then the runnable):
  my_ext: git@github.com:me/my-ext.git@v1.0#subdirectory=src     # or https://..., ./path, a PyPI requirement
  ---
  runnable: my_ext.train:Train          # a flambe_iac.Runnable subclass
  args: {epochs: 3}                     # passed to its constructor
  resources: {data: ./data}             # self.resources["data"] is this path

exit codes: 0 the runnable finished, 1 it raised, 2 bad input (nothing ran)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flambe-run", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a runnable on this machine: its extensions fetched with your own git, its secrets read "
                    "into `self.config` (configparser, no interpolation), its resources as `self.resources`.")
    parser.add_argument("runnable_file", type=Path, metavar="runnable.yaml")
    parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    parser.add_argument("--secrets", type=Path, metavar="FILE",
                        help=f"secrets ini (default {DEFAULT_SECRETS} if it exists)")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return exit_code_of("flambe-run", lambda: run(arguments))


def run(arguments: argparse.Namespace) -> int:
    secrets = choose_secrets(arguments.secrets)
    if secrets is not None:
        read_secrets_file(secrets)  # the same checks, and line numbers without contents, as flambe-deploy
    runnable_file, checkouts, resources = load_runnable(arguments.runnable_file)
    parse_resources(resources)  # the same checks as flambe-deploy: names, paths that exist
    sys.path[:0] = [str(path) for path in import_paths(checkouts)]
    try:
        run_runnable(runnable_file.runnable, runnable_file.args, secrets_config(secrets), runnable_file.resources)
    except RunnableError as error:
        print(f"flambe-run: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def choose_secrets(given: Path | None) -> Path | None:
    if given is not None:
        if not given.expanduser().is_file():
            raise InputError(f"secrets file {given} does not exist (flambe-run never runs without the secrets named)")
        return given.expanduser()
    default = DEFAULT_SECRETS.expanduser()
    return default if default.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
