"""The one way this machine's files are written: whole or not at all (reports, pins, ssh configs, the lab's files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

PRIVATE = 0o600
READABLE = 0o644


def write_atomically(path: Path, content: bytes | str, mode: int = PRIVATE) -> None:
    """PATH holds CONTENT, or what it held before: written to a temporary name beside it, created with MODE (never
    wider for a moment), then renamed over it. A symlink at PATH is replaced, never followed."""
    data = content.encode() if isinstance(content, str) else content
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, document, mode: int = READABLE) -> None:
    write_atomically(path, json.dumps(document, indent=2) + "\n", mode)
