"""What a tree holds, listed here and on a host in forms that agree: the one walk of a local tree, the summary both
sides compute (so an unchanged copy costs a few bytes to recognise, however many files it holds), and the full
listing that names what differs.

An entry is ("f", path, size, mtime) for a file (mtime in whole seconds), ("d", path) for a directory, ("l", path,
target) for a symlink. Names are str, the bytes that are not UTF-8 kept by os.fsdecode's surrogateescape: lossless
both ways, whatever bytes a name holds (a newline, a backslash, a leading dash, 255 bytes). On a host the listings
are NUL-separated, since a name may hold any byte but NUL and "/".

The summary is the sha256 of one record a file or directory, sorted by bytes (`f/SIZE/MTIME/PATH`, with find's
`%T@` mtime to the nanosecond; `d/PATH`), and the set of symlinks with their targets. A host whose filesystem keeps
coarser times never matches it: its copy is then compared by the full listing, to the second.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from flambe_iac.errors import InputError

TreeEntry = tuple
Stamp = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device: what the checksum cache keys on

_FILES_AND_DIRECTORIES = r"find . -mindepth 1 \( -type f -printf 'f/%s/%T@/%P\0' \) -o \( -type d -printf 'd/%P\0' \)"
_SYMLINKS = r"find . -mindepth 1 -type l -printf '%P\0%l\0'"
# The records end with END_RECORD, so that a find or sort that fails, printing nothing, never matches an empty tree.
END_RECORD = b"end"
# Run inside a tree on a host: the summary's digest on one line, then its symlinks, NUL-separated, in base64 lines.
REMOTE_TREE_SUMMARY = (f"{{ {_FILES_AND_DIRECTORIES}; printf '{END_RECORD.decode()}\\0'; }} | LC_ALL=C sort -z "
                       "| sha256sum | cut -c1-64; "
                       f"{{ {_SYMLINKS}; }} | base64")
# Run inside a tree on a host: every entry, NUL-separated; `parse_tree_listing` reads it.
REMOTE_TREE_LISTING = (r"find . -mindepth 1 \( -type f -printf 'f\0%P\0%s\0%T@\0' \) "
                       r"-o \( -type d -printf 'd\0%P\0' \) -o \( -type l -printf 'l\0%P\0%l\0' \)")
_FIELDS_AFTER_KIND = {b"f": 3, b"d": 1, b"l": 2}


@dataclass(frozen=True)
class TreeSummary:
    digest: str
    links: frozenset  # (path, target)


@dataclass
class LocalTree:
    """A local tree as one walk found it: its entries, its summary, and each file with its stamp."""

    entries: set[TreeEntry]
    summary: TreeSummary
    files: list[tuple[str, Stamp]]  # (path inside the tree, stamp), sorted by path
    special: list[tuple[str, int]]  # (path, st_mode) of what is not a file, directory or symlink: FIFOs, devices

    @property
    def size(self) -> int:
        return sum(stamp[0] for _, stamp in self.files)


def walk_tree(root: Path, excludes: tuple[str, ...] = ()) -> LocalTree:
    """ROOT (a directory, or one file) as rsync -a copies it into a directory; names in EXCLUDES left out at any
    depth. os.scandir, one stat a file: a million files take seconds, not minutes."""
    if not root.is_dir():
        return _tree([("f", root.name, os.stat(root))])
    found, pending = [], [("", str(root))]
    while pending:
        prefix, directory = pending.pop()
        try:
            found += _directory_entries(prefix, directory, excludes, pending)
        except OSError as error:  # an unreadable directory (a mount root's lost+found), or one removed meanwhile
            raise InputError(f"cannot read {directory}: {error.strerror}; a resource must be readable "
                             "throughout") from None
    return _tree(found)


def _directory_entries(prefix: str, directory: str, excludes: tuple[str, ...], pending: list) -> list:
    """The entries of one DIRECTORY, with PREFIX before their names; its subdirectories go on PENDING."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name in excludes:
                continue
            path = prefix + entry.name
            if entry.is_symlink():
                found.append(("l", path, os.readlink(entry.path)))
            elif entry.is_dir():
                found.append(("d", path, None))
                pending.append((path + "/", entry.path))
            else:
                found.append(("f", path, entry.stat(follow_symlinks=False)))
    return found


def _tree(found: list) -> LocalTree:
    entries, records, links, files, special = set(), [], set(), [], []
    for kind, path, detail in found:
        if kind == "f" and not stat.S_ISREG(detail.st_mode):
            special.append((path, detail.st_mode))
        elif kind == "f":
            entries.add(("f", path, detail.st_size, whole_seconds(detail.st_mtime_ns)))
            records.append(b"f/%d/%s/%s" % (detail.st_size, find_time(detail.st_mtime_ns), os.fsencode(path)))
            files.append((path, stamp(detail)))
        elif kind == "d":
            entries.add(("d", path))
            records.append(b"d/" + os.fsencode(path))
        else:
            entries.add(("l", path, detail))
            links.add((path, detail))
    records.append(END_RECORD)
    records.sort()
    digest = hashlib.sha256(b"".join(record + b"\0" for record in records)).hexdigest()
    files.sort()
    return LocalTree(entries, TreeSummary(digest, frozenset(links)), files, special)


def stamp(status: os.stat_result) -> Stamp:
    """What the checksum cache keys a file on. Writing a file changes its ctime, which no program can set back."""
    return status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev


def whole_seconds(nanoseconds: int) -> int:
    """An mtime as the hosts' listing gives it: its whole seconds, the fraction cut off (in integers: a float rounds
    x.9999999995 up to x+1)."""
    return nanoseconds // 10**9 if nanoseconds >= 0 else -(-nanoseconds // 10**9)


def find_time(nanoseconds: int) -> bytes:
    """An mtime as GNU find's %T@ prints it: seconds, a point, nine digits of nanoseconds and a 0."""
    seconds, fraction = divmod(nanoseconds, 10**9)
    return b"%d.%09d0" % (seconds, fraction)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    """TEXT is a sha256 as every tool here prints it: 64 lowercase hexadecimal digits, nothing else. The one check of
    a digest's shape, for what hosts answer and what the checksum cache holds."""
    return isinstance(text, str) and _SHA256_HEX.fullmatch(text) is not None


def parse_tree_summary(digest_line: str, link_lines: list[str]) -> TreeSummary:
    """What REMOTE_TREE_SUMMARY printed, as lines; anything else is a ValueError."""
    digest = digest_line.strip()
    if not is_sha256(digest):
        raise ValueError("a tree summary without its digest")
    fields = nul_fields(base64_lines(link_lines))
    if len(fields) % 2:
        raise ValueError("a symlink without its target")
    names = [os.fsdecode(field) for field in fields]
    return TreeSummary(digest, frozenset(zip(names[::2], names[1::2])))


def parse_tree_listing(data: bytes) -> set[TreeEntry]:
    """What REMOTE_TREE_LISTING printed; anything else is a ValueError."""
    fields = nul_fields(data)
    entries, index = set(), 0
    while index < len(fields):
        kind = fields[index]
        count = _FIELDS_AFTER_KIND.get(kind)
        if count is None or index + count >= len(fields):
            raise ValueError("a tree listing entry of no known kind")
        values = [os.fsdecode(field) for field in fields[index + 1:index + 1 + count]]
        index += 1 + count
        if kind == b"f":
            entries.add(("f", values[0], int(values[1]), int(values[2].split(".")[0])))
        else:
            entries.add((kind.decode(), *values))
    return entries


def nul_fields(data: bytes) -> list[bytes]:
    """The NUL-terminated fields of DATA; ValueError if the last one is cut short."""
    if not data:
        return []
    fields = data.split(b"\0")
    if fields[-1] != b"":
        raise ValueError("a listing cut short")
    return fields[:-1]


def base64_lines(lines: list[str]) -> bytes:
    return base64.b64decode("".join(lines), validate=True)
