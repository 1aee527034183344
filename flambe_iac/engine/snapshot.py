"""The host's state, read in one round trip per host before anything is written: what every step compares against.

Each step of the table says what it reads (`SnapshotRequest`); the driver merges them and reads once per host.
The read changes nothing on the host. It ends with a marker: a read cut short (the
connection dropped, the shell died) is a failure of the host, never an empty host.
Paths are relative to the SSH user's home. Contents are read only for files that hold no secret.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from flambe_iac.engine.remote_probes import answer_lines, framed, host_sections, inside_home, parse_checksums
from flambe_iac.inputs.tree_listing import REMOTE_TREE_SUMMARY, TreeSummary, parse_tree_summary
from flambe_iac.ssh.channel import RemoteCommandError, run_remote

END = "@end-of-snapshot"
LINK_TARGET = framed('printf %s "$t"')  # the host's text: a target may hold a newline and "@clock 0"
SNAPSHOT_LIMIT = 64 << 20  # bytes of the whole read: small files, tree summaries, excerpts
# bytes of one excerpt's output; a longer one arrives cut (its parser must refuse it). The manifest's members
# (departures.MANIFEST_EXCERPT_COMMAND) print up to 1 MiB: 4096 members take 300 KiB.
MAX_EXCERPT = 2 << 20


@dataclass(frozen=True)
class SnapshotRequest:
    files: tuple[str, ...] = ()  # mode and sha256 of each
    contents: tuple[str, ...] = ()  # bytes of each (never a secret)
    trees: tuple[str, ...] = ()  # listing of each directory
    links: tuple[str, ...] = ()  # where each points, if it is a symlink, and whether it can be rewritten
    tools: tuple[str, ...] = ()  # commands that must exist on the host
    processes: tuple[str, ...] = ()  # process names (as pgrep -x matches them): is one of the user's running?
    excerpts: tuple[tuple[str, str], ...] = ()  # (name, shell command that reads without writing): what it prints

    def __or__(self, other: SnapshotRequest) -> SnapshotRequest:
        def merged(name):
            return tuple(dict.fromkeys((*getattr(self, name), *getattr(other, name))))
        return SnapshotRequest(*(merged(name) for name in ("files", "contents", "trees", "links", "tools",
                                                           "processes", "excerpts")))


@dataclass
class HostSnapshot:
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # regular files: path -> (octal mode, sha256)
    contents: dict[str, bytes] = field(default_factory=dict)  # path -> bytes; absent if the file is
    trees: dict[str, TreeSummary] = field(default_factory=dict)  # path -> what it holds; absent if missing
    clock: int | None = None  # the host's time when it was read, in whole seconds
    links: dict[str, tuple[str, bool]] = field(default_factory=dict)  # symlink -> (resolved target, writable)
    missing_tools: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)  # of the processes asked for, those the user runs
    excerpts: dict[str, bytes] = field(default_factory=dict)  # name -> the first MAX_EXCERPT bytes it printed

    def matches(self, path: str, mode: str, sha256: str) -> bool:
        return self.files.get(path) == (mode, sha256)


class SnapshotError(Exception):
    pass


def snapshot_command(request: SnapshotRequest) -> str:
    parts = []
    if request.files:
        quoted = " ".join(shlex.quote(path) for path in request.files)
        parts.append(f"stat -L -c '@file %f %a %n' -- {quoted} 2>/dev/null")
        parts.append(f"sha256sum -- {quoted} 2>/dev/null | sed 's/^/@sha /'")
    for path in request.contents:
        quoted = shlex.quote(path)
        parts.append(f"if [ -f {quoted} ]; then printf '@read %s\\n' {quoted}; base64 < {quoted}; fi")
    for path in request.links:
        quoted = shlex.quote(path)
        parts.append(
            f'if [ -L {quoted} ]; then t=$(readlink -f {quoted}); w=0; d=$(dirname "$t"); '
            f'if [ -w "$d" ] && {{ [ -w "$t" ] || [ ! -e "$t" ]; }}; then w=1; fi; '
            f"printf '@link %s %s\\n' \"$w\" {quoted}; {LINK_TARGET}; fi"
        )
    for path in request.trees:
        quoted = shlex.quote(path)
        parts.append(f"if [ -d {quoted} ]; then printf '@tree %s\\n' {quoted}; "
                     f"(cd {inside_home(path)} && {{ {REMOTE_TREE_SUMMARY}; }}); fi")
    for tool in request.tools:
        # bash's `command -v` also names a file it cannot run: check that it is a runnable file.
        parts.append(f"{{ p=$(command -v {shlex.quote(tool)}) && [ -f \"$p\" ] && [ -x \"$p\" ]; }} "
                     f"|| printf '@missing %s\\n' {shlex.quote(tool)}")
    for name in request.processes:
        parts.append(f'if pgrep -u "$(id -u)" -x {shlex.quote(name)} >/dev/null 2>&1; then '
                     f"printf '@running %s\\n' {shlex.quote(name)}; fi")
    for name, command in request.excerpts:
        parts.append(f"printf '@excerpt %s\\n' {shlex.quote(name)}; "
                     f"{{ {command}; }} 2>/dev/null | head -c {MAX_EXCERPT} | base64")
    parts.append(f"printf '@clock %s\\n' \"$(date +%s)\"; echo {END}")
    return "; ".join(parts)


def read_snapshot(host, request: SnapshotRequest, timeout: float) -> HostSnapshot:
    try:
        result = run_remote(host, snapshot_command(request), timeout=timeout, limit=SNAPSHOT_LIMIT)
    except RemoteCommandError as error:
        raise SnapshotError(f"could not read the host's state: {error}") from None
    if result.exit_code != 0 and answer_lines(result.stdout)[-1:] == [END]:
        raise SnapshotError(f"could not read the host's state: {result.reason}")
    return snapshot_from_answer(result.stdout, result.reason)


def snapshot_after_lock(held, timeout: float) -> HostSnapshot:
    """The host's state as its deploy lock's session printed it once locked (engine/lock.py runs the read there)."""
    try:
        answer = held.read_through(END.encode(), SNAPSHOT_LIMIT, timeout)
    except RemoteCommandError as error:
        raise SnapshotError(f"could not read the host's state: {error}") from None
    return snapshot_from_answer(answer)


def snapshot_from_answer(output: bytes, reason: str = "") -> HostSnapshot:
    """The host's state from what the read printed (in its own session, or after the deploy lock in the lock's)."""
    lines = answer_lines(output)
    if not lines or lines[-1] != END:
        cut = f" ({reason})" if reason else ""
        raise SnapshotError(f"could not read the host's state: the read was cut short{cut}")
    return parse_snapshot(lines[:-1])


def parse_snapshot(output: list[str]) -> HostSnapshot:
    """The host's state from the read's lines; a line that is not as the read prints it is a SnapshotError."""
    try:
        return _parse_snapshot(output)
    except (ValueError, IndexError) as error:  # binascii.Error is a ValueError: damaged base64
        raise SnapshotError(f"unreadable host state ({type(error).__name__}: the read printed a malformed line); "
                            "is the host's shell clean?") from None


def _malformed(what: str):
    raise ValueError(f"{what} that is not one")


def _parse_snapshot(output: list[str]) -> HostSnapshot:
    snapshot = HostSnapshot()
    modes, digests = {}, {}
    for section in host_sections(output):
        marker, rest = section.name, section.argument
        if marker == "@read":
            snapshot.contents[rest] = section.text()
        elif marker == "@tree":
            snapshot.trees[rest] = parse_tree_summary(section.body[0], section.body[1:])
        elif marker == "@file":
            raw_mode, mode, name = rest.split(" ", 2)
            if int(raw_mode, 16) & 0o170000 == 0o100000:  # a regular file, not a directory
                modes[name] = mode.zfill(3)
        elif marker == "@sha":  # sha256sum's line, escaped as it escapes a name with a newline or a backslash
            digests.update(parse_checksums(rest.encode(errors="surrogateescape")) or _malformed("a checksum line"))
        elif marker == "@link":
            writable, name = rest.split(" ", 1)
            snapshot.links[name] = (section.text().decode(errors="surrogateescape"), writable == "1")
        elif marker == "@missing":
            snapshot.missing_tools.add(rest)
        elif marker == "@running":
            snapshot.running.add(rest)
        elif marker == "@clock":
            snapshot.clock = int(rest)
        elif marker == "@excerpt":
            snapshot.excerpts[rest] = section.text()
    snapshot.files = {name: (mode, digests[name]) for name, mode in modes.items() if name in digests}
    return snapshot
