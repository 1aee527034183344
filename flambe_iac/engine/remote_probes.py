"""Shell probes that more than one command runs on a host, each with the one parser of its output."""

from __future__ import annotations

import shlex

from flambe_iac.engine.remote_layout import RUN_PID

# openssl's sha256 uses the CPU's SHA instructions: five times faster than coreutils' sha256sum here.
_CHECKSUM_EVERY_FILE = ("if command -v openssl >/dev/null 2>&1; then hash='openssl dgst -sha256 -r'; "
                        "else hash='sha256sum --'; fi; find . -type f -print0 | xargs -0 -r $hash")

# True while the runnable that RUN_PID names is alive (a reused pid of another program does not count); sets $pid.
RUNNABLE_RUNNING = (f'[ -f {RUN_PID} ] && pid=$(cat {RUN_PID}) && kill -0 "$pid" 2>/dev/null '
                    f'&& grep -q flambe_iac.runnable "/proc/$pid/cmdline" 2>/dev/null')


def checksums_command(directory: str) -> str:
    """The sha256 of every file under DIRECTORY (relative to the home), one `HASH PATH` line each."""
    return f"cd {shlex.quote(directory)} && {_CHECKSUM_EVERY_FILE}"


def parse_checksums(lines: list[str]) -> dict[str, str]:
    """{path relative to the directory: sha256} from what `checksums_command` printed."""
    found = {}
    for line in lines:
        digest, _, path = line.partition(" ")
        path = path[1:] if path.startswith(("*", " ")) else path  # openssl: "HASH *PATH"; sha256sum: "HASH  PATH"
        found[path[2:] if path.startswith("./") else path] = digest
    return found
