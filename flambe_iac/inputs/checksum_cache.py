"""The local checksum cache: a resource file's sha256 is computed again only when the file has changed.

~/.flambe/checksums.sqlite (0600, in a 0700 directory) records, by each file's absolute path, the stamp the file had
when it was hashed and its sha256. The stamp is its size, mtime and ctime in nanoseconds, inode and device: writing
a file changes its ctime, which no program can set back, so a file rewritten with its old size and mtime restored is
still hashed again. A file that changes while it is hashed is not remembered. A damaged cache is started afresh.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Callable, Iterable

CACHE_PATH = Path("~/.flambe/checksums.sqlite")
Stamp = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device
_SCHEMA = ("CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
           "ctime_ns INTEGER, inode INTEGER, device INTEGER, sha256 TEXT) WITHOUT ROWID")


def stamp_of(path: Path) -> Stamp:
    status = os.stat(path, follow_symlinks=False)
    return status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev


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
            rows = database.execute("SELECT path, size, mtime_ns, ctime_ns, inode, device, sha256 FROM files "
                                    "WHERE path = ? OR (path >= ? AND path < ?)", (os.fsencode(root), low, high))
            return {row[0]: (tuple(row[1:6]), row[6]) for row in rows}

    def remember(self, root: Path, checksums: dict[bytes, tuple[Stamp, str]]) -> None:
        """CHECKSUMS become what the cache holds under ROOT: files no longer there are forgotten."""
        with self._connection() as database:
            if database is None:
                return
            low, high = _under(root)
            with database:  # one transaction
                database.execute("DELETE FROM files WHERE path = ? OR (path >= ? AND path < ?)",
                                 (os.fsencode(root), low, high))
                database.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     ((path, *stamp, digest) for path, (stamp, digest) in checksums.items()))

    def _connection(self):
        return _Connection(self.path)


class _Connection:
    """A connection to the cache file, made private before SQLite first opens it; None when it cannot be used."""

    def __init__(self, path: Path):
        self.path = path
        self.database = None

    def __enter__(self) -> sqlite3.Connection | None:
        try:
            self.database = self._open()
        except sqlite3.DatabaseError:  # not a database (damaged, or cut short): the cache starts afresh
            self.path.unlink(missing_ok=True)
            self.database = self._open()
        except OSError:
            return None  # an unwritable home: every file is hashed, as without a cache
        return self.database

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        database = sqlite3.connect(self.path, timeout=30)
        try:
            database.execute(_SCHEMA)
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


def cached_checksums(root: Path, files: list[Path], cache: ChecksumCache | None,
                     in_thread: Callable = lambda function, arguments: function(*arguments),
                     hash_files: Callable[[Callable, Iterable], Iterable] = map) -> dict[Path, str]:
    """{file: sha256} of FILES under ROOT, hashing only those the cache does not hold as they are now. IN_THREAD
    runs the stats and the cache's reads and writes, HASH_FILES the hashing (the deploy gives its thread pool's)."""
    known = in_thread(cache.known, (root,)) if cache else {}
    stamps = in_thread(_stamps, (files,))
    digests = {file: known[os.fsencode(file)][1] for file, stamp in stamps.items()
               if known.get(os.fsencode(file), (None,))[0] == stamp}
    changed = [file for file in files if file not in digests]
    digests.update(zip(changed, hash_files(sha256_of_file, changed)))
    if cache:
        after_hashing = in_thread(_stamps, (changed,))
        in_thread(cache.remember, (root, {
            os.fsencode(file): (stamp, digests[file]) for file, stamp in stamps.items()
            if file not in after_hashing or after_hashing[file] == stamp}))
    return digests


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamps(files: list[Path]) -> dict[Path, Stamp]:
    """The stamp of each file that is still there."""
    stamps = {}
    for file in files:
        try:
            stamps[file] = stamp_of(file)
        except FileNotFoundError:
            continue
    return stamps
