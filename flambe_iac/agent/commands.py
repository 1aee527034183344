"""The commands the agent runs (sudo, ssh to other members, Ray's stop), each bounded in time and in
what it may answer: another member's answer is not trusted to be short."""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass

SHUTDOWN = ("sudo", "-n", "shutdown", "-h", "now")


@dataclass(frozen=True)
class Answer:
    returncode: int
    stdout: str
    stderr: str


def run_quietly(argv, timeout: float, limit: int = 1 << 16, env: dict | None = None) -> Answer | None:
    """ARGV, with at most LIMIT bytes of each output kept (another member's answer is not trusted to be short);
    None if it cannot start (no such command; a NUL in an argument, which Popen refuses with ValueError) or does not
    end in TIMEOUT."""
    try:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env)
    except (OSError, ValueError):
        return None
    with process:
        outputs: dict[str, bytes] = {}
        readers = [threading.Thread(target=kept_prefix, args=(stream, limit, outputs, name), daemon=True)
                   for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))]
        for reader in readers:
            reader.start()
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return None
        for reader in readers:
            reader.join(1)
    return Answer(returncode, outputs.get("stdout", b"").decode(errors="replace"),
                  outputs.get("stderr", b"").decode(errors="replace"))


def kept_prefix(stream, limit: int, outputs: dict, name: str) -> None:
    """Read STREAM to its end (so its writer is never blocked), keeping only its first LIMIT bytes."""
    kept = b""
    for chunk in iter(lambda: stream.read(1 << 16), b""):
        kept += chunk[: max(0, limit - len(kept))]
    outputs[name] = kept
