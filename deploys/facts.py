"""Facts the deploys read from a host. Paths are relative to the SSH user's home."""

from __future__ import annotations

import base64
import shlex

from pyinfra.api import FactBase

MISSING = "FLAMBE-MISSING"


class FileBytes(FactBase):
    """A file's exact bytes (None if it does not exist), carried as base64 so nothing is lost.

    Only for files that hold no secret: fact output can reach debug logs.
    """

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return f"if [ -f {quoted} ]; then base64 < {quoted}; else echo {MISSING}; fi"

    def process(self, output: list[str]) -> bytes | None:
        if output == [MISSING]:
            return None
        return base64.b64decode("".join(output))

    @staticmethod
    def default() -> bytes:
        return b""


class FileState(FactBase):
    """(octal mode, sha256) of a regular file, or None: enough to know whether an upload would change it."""

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return (f"if [ -f {quoted} ] && [ ! -L {quoted} ]; then stat -c %a {quoted} && "
                f"sha256sum {quoted} | cut -c1-64; else echo {MISSING}; fi")

    def process(self, output: list[str]) -> tuple[str, str] | None:
        if output == [MISSING]:
            return None
        return output[0].strip().zfill(3), output[1].strip()


class TreeListing(FactBase):
    """What a directory holds, in the form `flambe_iac.resources.local_tree` gives; None if it is missing."""

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return (
            f"if cd {quoted} 2>/dev/null; then echo ROOT; find . -mindepth 1 "
            r"\( -type f -printf 'f\t%P\t%s\t%T@\n' \) -o \( -type d -printf 'd\t%P\n' \) "
            r"-o \( -type l -printf 'l\t%P\t%l\n' \); "
            f"else echo {MISSING}; fi"
        )

    def process(self, output: list[str]) -> set | None:
        if output == [MISSING]:
            return None
        entries = set()
        for line in output[1:]:
            fields = line.split("\t")
            if fields[0] == "f" and len(fields) == 4:
                entries.add(("f", fields[1], int(fields[2]), int(fields[3].split(".")[0])))
            elif fields[0] == "d":
                entries.add(("d", fields[1]))
            elif fields[0] == "l" and len(fields) == 3:
                entries.add(("l", fields[1], fields[2]))
        return entries
