"""A resource that lives in S3: `--resource NAME=s3://BUCKET/PREFIX`, checked before anything connects."""

from __future__ import annotations

import re
from dataclasses import dataclass

from flambe_iac.errors import InputError
from flambe_iac.names import check_tree_name

S3_SCHEME = "s3://"
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules for a general purpose bucket
MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class S3Resource:
    """Every object under BUCKET/PREFIX, kept identical in ~/resources/NAME/ of every host (a key's path below the
    prefix is its path there). PREFIX is empty or ends with '/'."""

    name: str
    bucket: str
    prefix: str
    parent: str = "resources"

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}"

    @property
    def remote_directory(self) -> str:
        return f"{self.parent}/{self.name}"


def is_s3_location(text: str) -> bool:
    return text.startswith(S3_SCHEME)


def split_s3_pairs(pairs: list[str]) -> tuple[list[str], list[S3Resource]]:
    """The NAME=PATH pairs for local trees, and the S3 resources; a name given twice, in either kind, is refused."""
    local, remote, names = [], [], set()
    for pair in pairs:
        name, _, location = pair.partition("=")
        if name in names:
            raise InputError(f"--resource: the name {name!r} is given twice; each resource needs its own name")
        names.add(name)
        if is_s3_location(location):
            remote.append(parse_s3_resource(name, location))
        else:
            local.append(pair)
    return local, remote


def parse_s3_resource(name: str, text: str) -> S3Resource:
    """NAME=s3://BUCKET/PREFIX as the user wrote it: a prefix names a folder, so s3://b/data is s3://b/data/."""
    where = f"--resource {name}={text}"
    bucket, _, prefix = text[len(S3_SCHEME):].partition("/")
    if not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise InputError(f"{where}: {bucket!r} is not an S3 bucket name (3 to 63 lowercase letters, digits, '.' and "
                         "'-'); write s3://BUCKET/PREFIX")
    if any(not character.isprintable() for character in prefix) or len(prefix.encode()) > MAX_KEY_BYTES:
        raise InputError(f"{where}: the prefix holds a control character or passes {MAX_KEY_BYTES} bytes")
    if any(part in (".", "..") for part in prefix.split("/")) or prefix.startswith("/") or "//" in prefix:
        raise InputError(f"{where}: write the prefix without '.', '..' or empty parts")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return S3Resource(check_tree_name(name, "resource"), bucket, prefix)
