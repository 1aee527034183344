"""Shell probes that more than one command runs on a host, each with the one parser of its output."""

from __future__ import annotations

import os
import re
import shlex

from flambe_iac.engine.remote_layout import RUN_PID

# openssl's sha256 uses the CPU's SHA instructions: five times faster than coreutils' sha256sum here. Both print
# `HASH *PATH` or `HASH  PATH`. A path with a newline goes to sha256sum, which prints it as `\HASH  ESCAPED` with
# backslashes and newlines escaped: openssl 3 escapes its newlines only, which cannot be read back.
_CHOOSE_HASH = ("if command -v openssl >/dev/null 2>&1; then hash='openssl dgst -sha256 -r'; "
                "else hash='sha256sum --'; fi")
_HASH_NEWLINE_PATHS = "find . -type f -path '*\n*' -print0 | xargs -0 -r sha256sum --"
_DIGEST = re.compile(rb"[0-9a-f]{64}")
_ESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}

# True while the runnable that RUN_PID names is alive (a reused pid of another program does not count); sets $pid.
RUNNABLE_RUNNING = (f'[ -f {RUN_PID} ] && pid=$(cat {RUN_PID}) && kill -0 "$pid" 2>/dev/null '
                    f'&& grep -q flambe_iac.runnable "/proc/$pid/cmdline" 2>/dev/null')


def checksums_command(directory: str) -> str:
    """The sha256 of every file under DIRECTORY (relative to the home)."""
    return (f"cd {shlex.quote(directory)} && {_CHOOSE_HASH}; "
            f"find . -type f ! -path '*\n*' -print0 | xargs -0 -r $hash; {_HASH_NEWLINE_PATHS}")


def listed_checksums_command(directory: str) -> str:
    """The sha256 of each file under DIRECTORY that stdin names (`listed_paths`), and of every file whose path holds
    a newline (few, and hashed by sha256sum): what a transfer wrote, not the whole tree."""
    return f"cd {shlex.quote(directory)} && {_CHOOSE_HASH}; xargs -0 -r $hash; {_HASH_NEWLINE_PATHS}"


def listed_paths(paths: list[str]) -> bytes:
    """PATHS as `listed_checksums_command` reads them, NUL-separated; those with a newline it finds itself."""
    return b"".join(b"./" + os.fsencode(path) + b"\0" for path in paths if "\n" not in path)


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
