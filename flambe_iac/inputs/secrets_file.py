"""The secrets ini: checked locally before anything is sent, and never echoed.

Error messages give line numbers, never line contents, since a bad line may hold a secret.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from flambe_iac.errors import InputError


def secrets_parser() -> configparser.ConfigParser:
    """How secrets are read everywhere: no interpolation, so a `%` in a password is just a `%`."""
    return configparser.ConfigParser(interpolation=None)


def read_secrets_file(path: Path) -> bytes:
    """The file's exact bytes, once they parse as an ini file."""
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"cannot read secrets file {path}: {error.strerror}") from None
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content[: error.start].count(b"\n") + 1
        raise InputError(f"secrets file {path}, line {line}: not UTF-8 text") from None
    try:
        secrets_parser().read_string(text, source=str(path))
    except configparser.MissingSectionHeaderError as error:
        raise InputError(
            f"secrets file {path}, line {error.lineno}: a value comes before any [section] header; "
            "start the file with a section such as [DEFAULT]"
        ) from None
    except configparser.ParsingError as error:
        lines = ", ".join(str(line) for line, _ in error.errors)
        raise InputError(
            f"secrets file {path}, line {lines}: not `key = value`, a [section] header or a comment"
        ) from None
    except (configparser.DuplicateSectionError, configparser.DuplicateOptionError) as error:
        what = (f"section [{error.section}]" if isinstance(error, configparser.DuplicateSectionError)
                else f"key {error.option!r} in [{error.section}]")
        raise InputError(f"secrets file {path}, line {error.lineno}: {what} appears twice") from None
    except configparser.Error as error:
        raise InputError(f"secrets file {path} is not a valid ini file ({type(error).__name__})") from None
    return content


class HiddenBytes:
    """Bytes that may be secret, with a repr that never shows them (operation arguments can reach logs)."""

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self) -> str:
        return f"<{len(self.data)} hidden bytes>"
