"""One fact, read once per host before anything is written: everything the deploys compare against.

A single round trip per host keeps large clusters fast; the steps then decide from this snapshot alone.
Paths are relative to the SSH user's home. Contents are read only for files that hold no secret
(fact output can reach debug logs).
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass, field

from pyinfra.api import FactBase

from flambe_iac.remote_layout import STAGING_DIR



@dataclass
class HostSnapshot:
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # regular files: path -> (octal mode, sha256)
    contents: dict[str, bytes] = field(default_factory=dict)  # path -> bytes; absent if the file is
    trees: dict[str, set] = field(default_factory=dict)  # path -> entries as resources.local_tree; absent if missing

    def matches(self, path: str, mode: str, sha256: str) -> bool:
        return self.files.get(path) == (mode, sha256)


class HostState(FactBase):
    """Reads the snapshot, and makes sure the private staging directory exists for the uploads that follow.

    A handful of processes per host, whatever the number of files: on a large cluster these add up.
    """

    def command(self, files: list[str], contents: list[str], trees: list[str]) -> str:
        staging = shlex.quote(STAGING_DIR)
        parts = [f"mkdir -p -m 700 {staging} && chmod 700 {staging}"]
        if files:
            quoted = " ".join(shlex.quote(path) for path in files)
            parts.append(f"stat -c '@file %f %a %n' -- {quoted} 2>/dev/null")
            parts.append(f"sha256sum -- {quoted} 2>/dev/null | sed 's/^/@sha /'")
        for path in contents:
            quoted = shlex.quote(path)
            parts.append(f"if [ -f {quoted} ]; then printf '@read %s\\n' {quoted}; base64 < {quoted}; fi")
        for path in trees:
            quoted = shlex.quote(path)
            parts.append(
                f"if [ -d {quoted} ]; then printf '@tree %s\\n' {quoted}; (cd {quoted} && find . -mindepth 1 "
                r"\( -type f -printf 'f\t%P\t%s\t%T@\n' \) -o \( -type d -printf 'd\t%P\n' \) "
                r"-o \( -type l -printf 'l\t%P\t%l\n' \)); fi"
            )
        return "; ".join(parts) + "; true"

    def process(self, output: list[str]) -> HostSnapshot:
        snapshot = HostSnapshot()
        modes, digests = {}, {}
        section, path, lines = None, None, []

        def close_section():
            if section == "@read":
                snapshot.contents[path] = base64.b64decode("".join(lines))
            elif section == "@tree":
                snapshot.trees[path] = {entry for entry in map(_tree_entry, lines) if entry}

        for line in output:
            if not line.startswith("@"):
                lines.append(line)
                continue
            close_section()
            marker, _, rest = line.partition(" ")
            section, path, lines = marker, rest, []
            if marker == "@file":
                raw_mode, mode, name = rest.split(" ", 2)
                if int(raw_mode, 16) & 0o170000 == 0o100000:  # a regular file, not a link or a directory
                    modes[name] = mode.zfill(3)
            elif marker == "@sha":
                digest, name = rest.split("  ", 1)
                digests[name] = digest
        close_section()
        snapshot.files = {name: (mode, digests[name]) for name, mode in modes.items() if name in digests}
        return snapshot

    @staticmethod
    def default() -> HostSnapshot:
        return HostSnapshot()


def _tree_entry(line: str) -> tuple | None:
    fields = line.split("\t")
    if fields[0] == "f" and len(fields) == 4:
        return ("f", fields[1], int(fields[2]), int(fields[3].split(".")[0]))
    if fields[0] == "d" and len(fields) == 2:
        return ("d", fields[1])
    if fields[0] == "l" and len(fields) == 3:
        return ("l", fields[1], fields[2])
    return None
