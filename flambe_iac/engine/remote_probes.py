"""Shell probes that more than one command runs on a host, each with the one parser of its output."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field

from flambe_iac.remote_layout import RUN_PID
from flambe_iac.inputs.tree_listing import (
    REMOTE_TREE_SUMMARY,
    TreeSummary,
    base64_lines,
    is_sha256,
    nul_fields,
    parse_tree_summary,
)

# openssl's sha256 uses the CPU's SHA instructions: five times faster than coreutils' sha256sum here. Both print
# `HASH *PATH` or `HASH  PATH`; sha256sum prints a path with a newline as `\HASH  ESCAPED` (backslashes, newlines and
# carriage returns escaped).
_CHOOSE_HASH = ("if command -v openssl >/dev/null 2>&1; then hash='openssl dgst -sha256 -r'; "
                "else hash='sha256sum --'; fi")
_ESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}

# True while the runnable that RUN_PID names is alive (a reused pid of another program does not count); sets $pid.
RUNNABLE_RUNNING = (f'[ -f {RUN_PID} ] && pid=$(cat {RUN_PID}) && kill -0 "$pid" 2>/dev/null '
                    f'&& grep -q flambe_iac.runnable "/proc/$pid/cmdline" 2>/dev/null')


def framed(command: str) -> str:
    """The shell that prints what COMMAND prints as the body of a section (`host_sections`): base64, whose alphabet
    holds neither "@" nor a newline of its own, so no byte that a job, a file or a record holds can end a section or
    open one. Any text a host holds reaches a section this way and no other."""
    return f"{{ {command}; }} | base64"


@dataclass
class Section:
    """One section of a host's answer: a line `@NAME ARGUMENT` (printed by our script, never by the host's
    content), then its body lines up to the next."""

    name: str  # "@tree"; "" for the lines before the first section
    argument: str = ""
    body: list[str] = field(default_factory=list)

    def text(self) -> bytes:
        """The body as `framed` printed it, decoded; ValueError if it is not base64."""
        return base64_lines(self.body)


def answer_lines(output: bytes | str) -> list[str]:
    """A host's answer as lines: only a newline ends one (a file name may hold \\x1c or \\x85, which
    str.splitlines also splits at)."""
    text = output.decode(errors="surrogateescape") if isinstance(output, bytes) else output
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def host_sections(lines: list[str]) -> list[Section]:
    """LINES in sections: each line that starts with "@" opens one; the lines up to the next are its body. The one
    parser of every answer a host gives in sections (the state read, status, the copy check)."""
    sections = [Section("")]
    for line in lines:
        if line.startswith("@"):
            name, _, argument = line.partition(" ")
            sections.append(Section(name, argument))
        else:
            sections[-1].body.append(line)
    return sections


def checksums_command(directory: str) -> str:
    """The sha256 of every file under DIRECTORY (relative to the home)."""
    return f"cd {inside_home(directory)} && {{ {_hash_files()}; }}"


def copy_check_command(directory: str, changed_since: int | None) -> str:
    """DIRECTORY's summary; the files whose status changed after the host's time CHANGED_SINCE (every file if None);
    and the sha256 of each of them and of each file stdin names (`listed_paths`). rsync writes a file under another
    name and renames it into place: whatever mtime it then gives the file, its ctime is when it was written."""
    condition = "" if changed_since is None else f"-newerct @{int(changed_since)}"
    selected = framed(f"find . -type f {condition} -printf '%P\\0'")
    return (f"cd {inside_home(directory)} && {{ {REMOTE_TREE_SUMMARY}; }} && printf '@selected\\n' && "
            f"{selected} && printf '@checksums\\n' && "
            f"{{ {_hash_files(condition)}; xargs -0 -r sha256sum -- || failed=$?; [ \"$failed\" = 0 ]; }}")


def listed_paths(paths: list[str]) -> bytes:
    """PATHS (inside the directory) as `copy_check_command` reads them on stdin: NUL-separated, any byte."""
    return b"".join(b"./" + os.fsencode(path) + b"\0" for path in paths)


def inside_home(directory: str) -> str:
    """DIRECTORY (relative to the home) for `cd`, quoted: "./" first, so that no CDPATH of the user's sends it
    elsewhere."""
    return shlex.quote(f"./{directory}")


def _hash_files(condition: str = "") -> str:
    """Hash each file under . that meets CONDITION (find's tests): by openssl, or sha256sum for a path with a
    newline (openssl 3 escapes newlines but not backslashes, which cannot be read back; in the C locale, so that a
    name that is not UTF-8 still matches). Several commands: put it in braces after a `cd`, or a failed cd would
    hash the home."""
    return (f"{_CHOOSE_HASH}; failed=0; "
            f"LC_ALL=C find . -type f {condition} ! -path '*\n*' -print0 | xargs -0 -r $hash || failed=$?; "
            f"LC_ALL=C find . -type f {condition} -path '*\n*' -print0 | xargs -0 -r sha256sum -- || failed=$?; "
            '[ "$failed" = 0 ]')


def parse_copy_check(output: bytes) -> tuple[TreeSummary, set[str], dict[str, str]]:
    """(the tree's summary, the files the host selected, {path: sha256} of the files hashed) from
    `copy_check_command`; ValueError if malformed."""
    sections = host_sections(answer_lines(output))
    if [section.name for section in sections] != ["", "@selected", "@checksums"]:
        raise ValueError("the check was cut short")
    summary, selected, hashes = sections
    names = nul_fields(selected.text())
    return (parse_tree_summary(summary.body[0] if summary.body else "", summary.body[1:]),
            {os.fsdecode(name) for name in names},
            parse_checksums("\n".join(hashes.body).encode(errors="surrogateescape")))


def parse_checksums(output: bytes) -> dict[str, str]:
    """{path relative to the directory: sha256} from what a checksums command printed. A line that is not a
    checksum line is left out: a file it would have named has no checksum, which its caller treats as a failure."""
    found = {}
    for line in output.split(b"\n"):
        escaped = line.startswith(b"\\")
        digest, _, path = line[escaped:].partition(b" ")
        if not is_sha256(digest.decode("ascii", "replace")) or not path.startswith((b"*", b" ")):
            continue
        path = path[1:]  # openssl: "HASH *PATH"; sha256sum: "HASH  PATH"
        if escaped:
            path = re.sub(rb"\\(.)", lambda match: _ESCAPES.get(match.group(1), match.group(0)), path, flags=re.DOTALL)
        found[os.fsdecode(path[2:] if path.startswith(b"./") else path)] = digest.decode()
    return found
