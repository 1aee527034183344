"""The one exception family, and the exit code each member maps to.

Every message says what was wrong and what to do about it.
"""

import sys
from typing import Callable

from flambe_iac.terminal import safe_field

EXIT_OK = 0
EXIT_HOST_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


class FlambeError(Exception):
    exit_code = EXIT_HOST_FAILED


class InputError(FlambeError):
    """Bad input, found before anything was sent to any host."""

    exit_code = EXIT_BAD_INPUT


class HostError(FlambeError):
    """Something failed on, or on the way to, a host."""

    exit_code = EXIT_HOST_FAILED


class LabError(FlambeError):
    """The local lab could not be built or torn down."""

    exit_code = EXIT_HOST_FAILED


def exit_code_of(program: str, action: Callable[[], int]) -> int:
    """Run a command's ACTION; a FlambeError becomes one line on stderr and its exit code. The one place that
    maps the family to exit codes, for every command."""
    try:
        return action()
    except FlambeError as error:
        print(f"{program}: {safe_field(str(error))}", file=sys.stderr)
        return error.exit_code


def describe_exception(error: BaseException) -> str:
    """An exception in words, for a report: its type, and its message if it has one."""
    if isinstance(error, EOFError):
        return "the connection to the host dropped (EOF)"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
