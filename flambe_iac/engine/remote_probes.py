"""Shell probes that more than one command runs on a host, each with the one parser of its output."""

from __future__ import annotations

import os
import re
import shlex

from flambe_iac.engine.remote_layout import RUN_PID
from flambe_iac.inputs.tree_listing import REMOTE_TREE_SUMMARY, TreeSummary, parse_tree_summary

# openssl's sha256 uses the CPU's SHA instructions: five times faster than coreutils' sha256sum here. Both print
# `HASH *PATH` or `HASH  PATH`; sha256sum prints a path with a newline as `\HASH  ESCAPED` (backslashes, newlines and
# carriage returns escaped).
_CHOOSE_HASH = ("if command -v openssl >/dev/null 2>&1; then hash='openssl dgst -sha256 -r'; "
                "else hash='sha256sum --'; fi")
_CHECKSUMS_FOLLOW = b"@checksums\n"
_DIGEST = re.compile(rb"[0-9a-f]{64}")
_ESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}

# True while the runnable that RUN_PID names is alive (a reused pid of another program does not count); sets $pid.
RUNNABLE_RUNNING = (f'[ -f {RUN_PID} ] && pid=$(cat {RUN_PID}) && kill -0 "$pid" 2>/dev/null '
                    f'&& grep -q flambe_iac.runnable "/proc/$pid/cmdline" 2>/dev/null')


def checksums_command(directory: str) -> str:
    """The sha256 of every file under DIRECTORY (relative to the home)."""
    return f"cd {shlex.quote(directory)} && {{ {_hash_files()}; }}"


def copy_check_command(directory: str, changed_since: int | None) -> str:
    """DIRECTORY's summary, then the sha256 of each file in it whose status changed after the host's time
    CHANGED_SINCE, or of every file if None. rsync writes a file under another name and renames it into place:
    whatever mtime it then gives the file, its ctime is when it was written, which no one can set back."""
    return (f"cd {shlex.quote(directory)} && {{ {REMOTE_TREE_SUMMARY}; }} && printf '@checksums\\n' "
            f"&& {{ {_hash_files('' if changed_since is None else f'-newerct @{int(changed_since)}')}; }}")


def _hash_files(condition: str = "") -> str:
    """Hash each file under . that meets CONDITION (find's tests): by openssl, or sha256sum for a path with a
    newline (openssl 3 escapes newlines but not backslashes, which cannot be read back). Several commands: put it
    in braces after a `cd`, or a failed cd would hash the home."""
    return (f"{_CHOOSE_HASH}; failed=0; "
            f"find . -type f {condition} ! -path '*\n*' -print0 | xargs -0 -r $hash || failed=$?; "
            f"find . -type f {condition} -path '*\n*' -print0 | xargs -0 -r sha256sum -- || failed=$?; "
            '[ "$failed" = 0 ]')


def parse_copy_check(output: bytes) -> tuple[TreeSummary, dict[str, str]]:
    """(the tree's summary, {path: sha256} of the files hashed) from `copy_check_command`; ValueError if
    malformed."""
    summary, separator, hashes = output.partition(_CHECKSUMS_FOLLOW)
    lines = summary.decode(errors="replace").split("\n")
    if not separator:
        raise ValueError("the check was cut short")
    return parse_tree_summary(lines[0], lines[1:]), parse_checksums(hashes)


def parse_checksums(output: bytes) -> dict[str, str]:
    """{path relative to the directory: sha256} from what a checksums command printed. A line that is not a
    checksum line is left out: the file it would have named counts as missing."""
    found = {}
    for line in output.split(b"\n"):
        escaped = line.startswith(b"\\")
        digest, _, path = line[escaped:].partition(b" ")
        if not _DIGEST.fullmatch(digest) or not path.startswith((b"*", b" ")):
            continue
        path = path[1:]  # openssl: "HASH *PATH"; sha256sum: "HASH  PATH"
        if escaped:
            path = re.sub(rb"\\(.)", lambda match: _ESCAPES.get(match.group(1), match.group(0)), path, flags=re.DOTALL)
        found[os.fsdecode(path[2:] if path.startswith(b"./") else path)] = digest.decode()
    return found
