"""What every host must hold of an S3 resource: its objects, listed here with the user's own credentials
(read-only: ListObjectsV2 and HeadObject), each with the size, ETag and checksum its copy is checked against.

The checksum a host checks is, in this order: the object's SHA256 where S3 stores one for the whole object; else
the MD5 that a single-part upload's ETag is (not under SSE-KMS or SSE-C, whose ETags are not an MD5). S3's
CRC64NVME is not used yet: a host has no CRC64NVME in its standard library (docs/s3.md).
An object with neither is refused unless --allow-unverified.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import hashlib
import json
import re
import time
from dataclasses import dataclass

from flambe_iac.aws.client import aws_errors, service_client
from flambe_iac.aws.s3_head_cache import HeadCache
from flambe_iac.errors import InputError
from flambe_iac.inputs.s3_location import S3Resource

HEAD_WORKERS = 16
HEAD_BATCH = 10_000
LIST_DEADLINE = 900.0  # seconds for one resource's whole listing
MAX_OBJECTS = 1_000_000
MD5_ETAG = re.compile(r'"([0-9a-f]{32})"')
PULL_STAGING = ".flambe-s3-partial"  # agent/s3_pull.py's STAGING, inside each S3 resource's directory
CHECKSUM_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "md5": re.compile(r"[0-9a-f]{32}"), "none": re.compile("")}
NONE = "none"  # the algorithm of an object no host can check (with --allow-unverified)


@dataclass(frozen=True)
class S3Object:
    path: str  # below the prefix: where it goes in ~/resources/NAME/
    key: str
    size: int
    etag: str  # as S3 sends it, quoted: a host fetches with If-Match, so it gets this version or nothing
    algorithm: str  # "sha256", "md5" or NONE
    checksum: str  # hex
    mode: int = 0o644  # the file's on the hosts


@dataclass(frozen=True)
class S3Listing:
    resource: S3Resource
    region: str
    objects: tuple[S3Object, ...]

    @property
    def unverified(self) -> list[str]:
        return [item.key for item in self.objects if item.algorithm == NONE]

    @property
    def size(self) -> int:
        return sum(item.size for item in self.objects)

    def job_objects(self) -> list[list]:
        return [[item.path, item.key, item.size, item.etag, item.algorithm, item.checksum, item.mode]
                for item in self.objects]

    def digest(self) -> str:
        """Names this listing: a host whose last pull recorded it, and whose copy is untouched since, has it all."""
        document = [self.resource.bucket, self.resource.prefix, self.job_objects()]
        return hashlib.sha256(json.dumps(document, separators=(",", ":")).encode()).hexdigest()


def list_s3_resources(resources: list[S3Resource], allow_unverified: bool, client=None,
                      cache: HeadCache | None = None) -> dict[str, S3Listing]:
    """Every resource's listing, or an InputError in words: nothing reaches a host before all are listed. CACHE:
    the HeadObject answers of earlier runs, which a listing that shows an object unchanged reuses."""
    if not resources:
        return {}
    client, cache = client or service_client("s3"), cache or HeadCache()
    return {resource.name: list_resource(client, resource, allow_unverified, cache) for resource in resources}


def list_resource(client, resource: S3Resource, allow_unverified: bool, cache: HeadCache) -> S3Listing:
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + LIST_DEADLINE
    try:
        with aws_errors(f"listing {resource.url}", "the hosts read it with their own role; this machine lists it"):
            region = bucket_region(client, resource.bucket)
            keys = listed_keys(client, resource, deadline)
            heads = read_heads(client, resource, keys, cache, deadline)
    except (ClientError, BotoCoreError) as error:
        raise InputError(s3_failure(f"listing {resource.url}", error)) from None
    if not keys:
        raise InputError(f"{resource.url} holds no object: check the prefix (an empty listing would empty "
                         f"~/resources/{resource.name} on every host)")
    objects = tuple(described(resource, path, key, heads[key], allow_unverified) for key, path, _ in keys)
    refuse_clashes(resource, [item.path for item in objects])
    return S3Listing(resource, region, objects)


def s3_failure(doing: str, error) -> str:
    """A ClientError or BotoCoreError of S3, in words (an HTTP status alone for HEAD requests, which have no body)."""
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    if not code:
        return f"{doing} failed: {error}"
    meaning = {"403": "refused (this machine needs s3:ListBucket, s3:GetObject and, to stage, s3:PutObject)",
               "AccessDenied": "refused (this machine needs s3:ListBucket, s3:GetObject and, to stage, s3:PutObject)",
               "404": "no such bucket or key", "NoSuchBucket": "no such bucket",
               "BadDigest": "S3 refused bytes that are not the file's sha256: it changed while it was sent"}
    return f"{doing}: {meaning.get(code, 'failed')} ({code})"


def bucket_region(client, bucket: str) -> str:
    answer = client.head_bucket(Bucket=bucket)
    headers = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    return headers.get("x-amz-bucket-region") or client.meta.region_name or "us-east-1"


def listed_keys(client, resource: S3Resource, deadline: float) -> list[tuple[str, str, tuple]]:
    """(key, path below the prefix, (ETag, size, LastModified) as listed) of every object, folder markers left out;
    hostile keys refused in words."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=resource.bucket, Prefix=resource.prefix):
        if time.monotonic() > deadline:
            raise InputError(f"listing {resource.url} took over {LIST_DEADLINE:g} s: give a narrower prefix")
        for entry in page.get("Contents", []):
            key = entry["Key"]
            path = key[len(resource.prefix):]
            if path.endswith("/") and entry.get("Size") == 0:
                continue  # a console "folder"
            check_object_path(resource, key, path)
            keys.append((key, path, (entry["ETag"], entry["Size"], entry["LastModified"].isoformat())))
        if len(keys) > MAX_OBJECTS:
            raise InputError(f"{resource.url} holds over {MAX_OBJECTS} objects: give a narrower prefix")
    return keys


def check_object_path(resource: S3Resource, key: str, path: str) -> None:
    parts = path.split("/")
    if not path or any(part in ("", ".", "..") for part in parts) or "\0" in path or parts[0] == PULL_STAGING:
        raise InputError(f"{resource.url}: the key {key!r} has no plain path below the prefix (an empty, '.' or '..' "
                         f"part, or {PULL_STAGING}, the pull's own): it cannot become a file in ~/resources/"
                         + resource.name)


def refuse_clashes(resource: S3Resource, paths: list[str]) -> None:
    """A key that is a file where another key needs a directory (a and a/b) has no place in one tree."""
    listed = set(paths)
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in listed:
                raise InputError(f"{resource.url}: {'/'.join(parts[:depth])!r} is an object and a folder of "
                                 f"{path!r}; one tree cannot hold both")


def read_heads(client, resource: S3Resource, keys: list, cache: HeadCache, deadline: float) -> dict[str, tuple]:
    """{key: (ETag, size, LastModified, algorithm, checksum)}: from CACHE where the listing shows the object as it
    was when its HeadObject was read; from HeadObject (ChecksumMode ENABLED) for the rest, then remembered."""
    known = {key: row for key, row in cache.known(resource.bucket, resource.prefix).items() if sound(row)}
    unknown = [key for key, _, listed in keys if known.get(key, ())[:3] != listed]
    for key, answer in zip(unknown, heads_of(client, resource, unknown, deadline)):
        known[key] = (answer["ETag"], int(answer["ContentLength"]), answer["LastModified"].isoformat(),
                      *checked_checksum(answer))
    heads = {key: known[key] for key, _, _ in keys}
    if unknown or len(heads) != len(known):
        cache.remember(resource.bucket, resource.prefix, heads)
    return heads


def sound(row: tuple) -> bool:
    """A cached row as `read_heads` writes them: an algorithm a host checks, with a digest of its length."""
    pattern = CHECKSUM_HEX.get(row[3]) if len(row) == 5 and isinstance(row[3], str) else None
    return pattern is not None and isinstance(row[4], str) and pattern.fullmatch(row[4]) is not None


def heads_of(client, resource: S3Resource, keys: list[str], deadline: float) -> list[dict]:
    """Each key's HeadObject answer, HEAD_WORKERS at once, a batch at a time; the first failure, or the deadline,
    ends them all."""
    answers = []
    with concurrent.futures.ThreadPoolExecutor(HEAD_WORKERS) as pool:
        for start in range(0, len(keys), HEAD_BATCH):
            futures = [pool.submit(client.head_object, Bucket=resource.bucket, Key=key, ChecksumMode="ENABLED")
                       for key in keys[start:start + HEAD_BATCH]]
            done, waiting = concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()),
                                                    return_when=concurrent.futures.FIRST_EXCEPTION)
            failed = [future for future in done if future.exception() is not None]
            if failed or waiting:
                for future in futures:
                    future.cancel()
                if failed:
                    raise failed[0].exception()
                raise InputError(f"listing {resource.url} took over {LIST_DEADLINE:g} s: give a narrower prefix")
            answers += [future.result() for future in futures]
    return answers


def described(resource: S3Resource, path: str, key: str, head: tuple, allow_unverified: bool) -> S3Object:
    etag, size, _, algorithm, checksum = head
    if algorithm == NONE and not allow_unverified:
        raise InputError(f"s3://{resource.bucket}/{key} has no checksum a host can check (no SHA256 of the whole "
                         "object, and its ETag is not an MD5: a multipart or KMS-encrypted upload): upload it again "
                         "with --checksum-algorithm SHA256, or pass --allow-unverified (the report then names it)")
    return S3Object(path, key, size, etag, algorithm, checksum)


def checked_checksum(answer: dict) -> tuple[str, str]:
    """(algorithm, hex) a host checks the object's bytes against, from its HeadObject answer; (NONE, "") if none."""
    sha256 = whole_object_sha256(answer)
    if sha256 is not None:
        return "sha256", sha256
    encrypted = answer.get("ServerSideEncryption", "").startswith("aws:kms") or answer.get("SSECustomerAlgorithm")
    etag = MD5_ETAG.fullmatch(answer.get("ETag", ""))
    if etag and not encrypted:
        return "md5", etag.group(1)
    return NONE, ""


def whole_object_sha256(answer: dict) -> str | None:
    """The SHA256 S3 stores of the whole object, as hex; None for none, or a checksum of its parts' checksums."""
    text = answer.get("ChecksumSHA256") or ""
    if not text or "-" in text or answer.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    try:
        digest = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    return digest.hex() if len(digest) == 32 else None
