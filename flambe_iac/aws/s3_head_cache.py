"""The local cache of HeadObject answers, so that a re-run of an unchanged S3 resource costs its listing alone.

~/.flambe/s3-heads.sqlite (0600, in a 0700 directory, as the checksum cache) records, by bucket and key, the ETag,
size and LastModified an object had when its HeadObject was read, and the checksum it gave. A listing that shows
all three again reuses it; an object written again, even with the same bytes, has a new LastModified and is read
again. A cache that cannot be used is done without.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flambe_iac.inputs.checksum_cache import PrivateDatabase

CACHE_PATH = Path("~/.flambe/s3-heads.sqlite")
_SCHEMA = ("CREATE TABLE IF NOT EXISTS heads (bucket TEXT, key TEXT, etag TEXT, size INTEGER, modified TEXT, "
           "algorithm TEXT, checksum TEXT, PRIMARY KEY (bucket, key)) WITHOUT ROWID")


class HeadCache:
    def __init__(self, path: Path = CACHE_PATH):
        self.path = path.expanduser()

    def known(self, bucket: str, prefix: str) -> dict[str, tuple]:
        """{key: (etag, size, modified, algorithm, checksum)} of the objects remembered under PREFIX."""
        with PrivateDatabase(self.path, _SCHEMA) as database:
            if database is None:
                return {}
            try:
                rows = database.execute("SELECT key, etag, size, modified, algorithm, checksum FROM heads "
                                        "WHERE bucket = ? AND substr(key, 1, ?) = ?",
                                        (bucket, len(prefix), prefix)).fetchall()
            except sqlite3.Error:  # damaged pages, a lock held too long: every object is read again
                return {}
            return {row[0]: tuple(row[1:]) for row in rows}

    def remember(self, bucket: str, prefix: str, heads: dict[str, tuple]) -> None:
        """HEADS become what the cache holds under PREFIX: objects no longer listed are forgotten."""
        with PrivateDatabase(self.path, _SCHEMA) as database:
            if database is None:
                return
            try:
                with database:
                    database.execute("DELETE FROM heads WHERE bucket = ? AND substr(key, 1, ?) = ?",
                                     (bucket, len(prefix), prefix))
                    database.executemany("INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?, ?, ?, ?)",
                                         ((bucket, key, *row) for key, row in heads.items()))
            except sqlite3.Error:  # a full disk, a lock held too long: the next run reads these again
                return
