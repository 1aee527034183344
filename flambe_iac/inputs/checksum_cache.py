"""The local checksum cache: a resource file's sha256 is computed again only when the file has changed.

~/.flambe/checksums.sqlite (0600, in a 0700 directory) records, by each file's absolute path, the stamp the file had
when it was hashed and its sha256. The stamp is its size, mtime and ctime in nanoseconds, inode and device: writing
a file changes its ctime, which no program can set back, so a file rewritten with its old size and mtime restored is
still hashed again. A file that changes while it is hashed is not remembered. A cache that is not a database is
started afresh; one that cannot be used (locked too long, damaged pages, a full disk) is done without.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from pathlib import Path
from typing import Callable, Iterable

from flambe_iac.inputs.tree_listing import Stamp, is_sha256, stamp

CACHE_PATH = Path("~/.flambe/checksums.sqlite")
_SCHEMA = ("CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
           "ctime_ns INTEGER, inode INTEGER, device INTEGER, sha256 TEXT) WITHOUT ROWID")


class ChecksumCache:
    """The cache at PATH. Each method opens its own connection: the deploy calls them from its worker threads."""

    def __init__(self, path: Path = CACHE_PATH):
        self.path = path.expanduser()

    def known(self, root: Path) -> dict[bytes, tuple[Stamp, str]]:
        """{absolute path: (stamp, sha256)} of every file remembered under ROOT (a directory, or one file)."""
        with self._connection() as database:
            if database is None:
                return {}
            low, high = _under(root)
            try:
                rows = database.execute("SELECT path, size, mtime_ns, ctime_ns, inode, device, sha256 FROM files "
                                        "WHERE path = ? OR (path >= ? AND path < ?)",
                                        (os.fsencode(root), low, high)).fetchall()
            except sqlite3.Error:  # damaged pages, a lock held too long: this run hashes without the cache
                return {}
            return {row[0]: (tuple(row[1:6]), row[6]) for row in rows
                    if is_sha256(row[6])}

    def remember(self, root: Path, checksums: dict[bytes, tuple[Stamp, str]]) -> None:
        """CHECKSUMS become what the cache holds under ROOT: files no longer there are forgotten."""
        with self._connection() as database:
            if database is None:
                return
            low, high = _under(root)
            try:
                with database:  # one transaction
                    database.execute("DELETE FROM files WHERE path = ? OR (path >= ? AND path < ?)",
                                     (os.fsencode(root), low, high))
                    database.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                                         ((path, *stamp, digest) for path, (stamp, digest) in checksums.items()))
            except sqlite3.Error:  # a full disk, a lock held too long: the next run hashes these files again
                return

    def _connection(self):
        return PrivateDatabase(self.path, _SCHEMA)


class PrivateDatabase:
    """A connection to a cache file of this user's (SCHEMA: its table), made private before SQLite first opens it;
    None when it cannot be used. The S3 listing's cache of HeadObject answers uses it too."""

    def __init__(self, path: Path, schema: str):
        self.path, self.schema = path, schema
        self.database = None

    def __enter__(self) -> sqlite3.Connection | None:
        try:
            self.database = self._open()
        except sqlite3.OperationalError:  # locked by another deploy for too long, or not openable: do without
            return None
        except sqlite3.DatabaseError:  # not a database (damaged, or cut short): the cache starts afresh
            for leftover in (self.path, self.path.with_name(self.path.name + "-journal")):
                leftover.unlink(missing_ok=True)
            try:
                self.database = self._open()
            except (sqlite3.Error, OSError):
                return None
        except OSError:
            return None  # an unwritable home: every file is hashed, as without a cache
        return self.database

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = os.lstat(self.path.parent)
        if directory.st_uid != os.geteuid() or directory.st_mode & 0o022 or not stat.S_ISDIR(directory.st_mode):
            raise PermissionError(f"{self.path.parent} is not this user's alone")  # another could swap the file
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(descriptor).st_uid != os.geteuid():
                raise PermissionError(f"{self.path} is not this user's")
            os.fchmod(descriptor, 0o600)
        finally:
            os.close(descriptor)
        database = sqlite3.connect(self.path, timeout=30)
        try:
            database.execute(self.schema)
        except sqlite3.DatabaseError:
            database.close()
            raise
        return database

    def __exit__(self, *exception) -> None:
        if self.database is not None:
            self.database.close()


def _under(root: Path) -> tuple[bytes, bytes]:
    """The range of paths below ROOT: "ROOT/" up to "ROOT0" ("0" follows "/")."""
    prefix = os.fsencode(root)
    return prefix + b"/", prefix + b"0"


def cached_checksums(root: Path, base: Path, files: list[tuple[str, Stamp]], cache: ChecksumCache | None,
                     in_thread: Callable = lambda function, arguments: function(*arguments),
                     hash_files: Callable[[Callable, Iterable], Iterable] = map) -> dict[str, str]:
    """{path: sha256} of FILES ((path inside BASE, its stamp now), as `walk_tree` lists them), hashing only those the
    cache does not hold under ROOT with that stamp. IN_THREAD runs the cache's reads and writes and HASH_FILES the
    hashing (the deploy gives its thread pool's)."""
    known = in_thread(cache.known, (root,)) if cache else {}
    stamps = dict(files)
    prefix = os.fsencode(base) + b"/"
    keys = {path: prefix + os.fsencode(path) for path in stamps}
    digests = {path: known[keys[path]][1] for path, stamp in stamps.items()
               if known.get(keys[path], (None,))[0] == stamp}
    changed = [path for path in stamps if path not in digests]
    digests.update(zip(changed, hash_files(sha256_of_file, [os.path.join(base, path) for path in changed])))
    if cache and (changed or len(known) != len(stamps)):
        after_hashing = in_thread(_stamps, ([os.path.join(base, path) for path in changed],))
        changed_while_hashed = {path for path in changed if after_hashing.get(os.path.join(base, path)) != stamps[path]}
        in_thread(cache.remember, (root, {keys[path]: (stamp, digests[path]) for path, stamp in stamps.items()
                                          if path not in changed_while_hashed}))
    return digests


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamps(files: list[str]) -> dict[str, Stamp]:
    """The stamp of each file that is still there."""
    stamps = {}
    for file in files:
        try:
            stamps[file] = stamp(os.stat(file, follow_symlinks=False))
        except FileNotFoundError:
            continue
    return stamps
