"""The commands the agent runs (sudo, ssh to other members, Ray's stop), each bounded in time and in
what it may answer: another member's answer is not trusted to be short."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

SHUTDOWN = ("sudo", "-n", "shutdown", "-h", "now")
OUTPUT_WAIT = 1.0  # seconds for the outputs once the command ended (or was killed)


@dataclass(frozen=True)
class Answer:
    returncode: int
    stdout: str
    stderr: str


def run_quietly(argv, timeout: float, limit: int = 1 << 16, env: dict | None = None) -> Answer | None:
    """ARGV, with at most LIMIT bytes of each output kept (another member's answer is not trusted to be short);
    None if it cannot start (no such command; a NUL in an argument, which Popen refuses with ValueError) or does not
    end in TIMEOUT (then it and its children are killed). A child it leaves behind holding its output (a daemon), or
    a process that cannot die (a wedged driver), holds the caller at most OUTPUT_WAIT seconds more."""
    try:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, start_new_session=True)
    except (OSError, ValueError):
        return None
    outputs: dict[str, bytes] = {}
    readers = [threading.Thread(target=kept_prefix, args=(stream, limit, outputs, name), daemon=True)
               for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))]
    for reader in readers:
        reader.start()
    try:
        returncode = process.wait(timeout)
    except subprocess.TimeoutExpired:
        end_group(process)
        return None
    except BaseException:  # Ctrl-C in the CLI's status: its own session no longer hears the terminal
        end_group(process)
        raise
    until = time.monotonic() + OUTPUT_WAIT
    for reader in readers:  # the streams are the readers' to close: closing one under a read would wait for it
        reader.join(max(0.0, until - time.monotonic()))
    return Answer(returncode, outputs.get("stdout", b"").decode(errors="replace"),
                  outputs.get("stderr", b"").decode(errors="replace"))


def end_group(process: subprocess.Popen) -> None:
    """Kill PROCESS and the children it started, then wait for it at most OUTPUT_WAIT (one in a wedged driver's
    call cannot die: it is left, never waited for)."""
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(OUTPUT_WAIT)


def kept_prefix(stream, limit: int, outputs: dict, name: str) -> None:
    """Read STREAM to its end (so its writer is never blocked), keeping only its first LIMIT bytes, in OUTPUTS as
    they come (a caller that stops waiting has what came)."""
    with stream:
        outputs[name] = bytearray()  # grows in place: bytes += bytes copies the whole answer at every chunk
        for chunk in iter(lambda: stream.read1(1 << 16), b""):
            if len(outputs[name]) < limit:
                outputs[name] += chunk[: limit - len(outputs[name])]
