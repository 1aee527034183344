"""--stage-via s3://BUCKET/PREFIX: each local resource crosses the user's uplink once, into S3, and every host pulls
it from there as it pulls an S3 resource (deploys/s3_resources.py), checked against the sha256 this machine computed.

The upload is content-addressed: a file's bytes go to PREFIX/sha256/<its sha256>, once however many files or runs
hold them, with its SHA256 given to S3, which refuses an upload whose bytes do not match it. A re-run uploads only
content S3 does not hold yet (one listing of PREFIX/sha256/ says which). A small manifest, PREFIX/manifests/<its
sha256>.json, names each tree's paths, modes and digests. Nothing is ever deleted: old content stays until a
lifecycle rule of yours removes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from pathlib import Path

from flambe_iac.aws.client import aws_errors, service_client
from flambe_iac.aws.s3_listing import S3Listing, S3Object, bucket_region, s3_failure
from flambe_iac.errors import InputError
from flambe_iac.inputs.checksum_cache import ChecksumCache
from flambe_iac.inputs.resources import Resource, checksums
from flambe_iac.inputs.s3_location import S3Resource, parse_s3_resource
from flambe_iac.inputs.tree_listing import LocalTree, stamp, walk_tree

SINGLE_PUT_LIMIT = 5 * 1000**3  # S3's largest PutObject; a larger file goes up in parts


def stage_resources(client, via: S3Resource, trees: dict[Resource, tuple[LocalTree, dict[str, str]]],
                    say=lambda words: print(words, file=sys.stderr)) -> dict[str, S3Listing]:
    """Each local resource's content into VIA, and the listing its hosts pull. TREES: resource -> (its walk, its
    files' sha256 by path). SAY: progress in words."""
    region = bucket_region(client, via.bucket)
    stored = stored_contents(client, via)
    held = {}
    listings = {}
    for resource, (tree, digests) in trees.items():
        refuse_unstageable(resource, tree)
        base = resource.path if resource.path.is_dir() else resource.path.parent
        stamps = dict(tree.files)
        sizes = {path: walked[0] for path, walked in stamps.items()}
        held.update({digests[path]: stored[digests[path]][0] for path in sizes
                     if stored.get(digests[path], (None, None))[1] == sizes[path]})
        missing = {digests[path]: (base / path, stamps[path]) for path in sizes if digests[path] not in held}
        say(f"staging {resource.name} via {via.url}: {len(missing)} of {len(set(digests.values()))} contents to "
            f"upload ({sum(sizes[path] for path in sizes if digests[path] in missing) / 1e6:.1f} MB)")
        for digest, (path, stamp) in missing.items():
            held[digest] = upload(client, via, digest, path, stamp)
        objects = tuple(S3Object(path, content_key(via, digests[path]), sizes[path], held[digests[path]], "sha256",
                                 digests[path], file_mode(base / path)) for path in sorted(sizes))
        put_manifest(client, via, resource, objects)
        listings[resource.name] = S3Listing(S3Resource(resource.name, via.bucket, via.prefix), region, objects)
    return listings


def content_key(via: S3Resource, digest: str) -> str:
    return f"{via.prefix}sha256/{digest}"


def stored_contents(client, via: S3Resource) -> dict[str, tuple[str, int]]:
    """sha256 -> (ETag, size) of the content VIA holds already: objects S3 checked against a SHA256 on their upload
    (a key this machine names by its content, and S3 refuses an upload whose bytes are not that SHA256)."""
    held = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=via.bucket, Prefix=f"{via.prefix}sha256/"):
        for entry in page.get("Contents", []):
            if "SHA256" in entry.get("ChecksumAlgorithm", []):
                held[entry["Key"].rsplit("/", 1)[1]] = (entry["ETag"], entry["Size"])
    return held


def refuse_unstageable(resource: Resource, tree: LocalTree) -> None:
    """S3 holds files: a symlink would arrive as a copy of what it points to, or not at all; a key must be UTF-8."""
    for entry in tree.entries:
        if entry[0] == "l":
            raise InputError(f"--stage-via: {resource.name} holds the symlink {entry[1]!r}; S3 carries files only: "
                             "send this tree with --fan-out instead, or replace the link")
        try:
            entry[1].encode()
        except UnicodeEncodeError:
            raise InputError(f"--stage-via: {resource.name} holds a name that is not UTF-8 ({entry[1]!r}), which "
                             "an S3 key cannot be; send this tree with --fan-out instead") from None


def upload(client, via: S3Resource, digest: str, path: Path, walked: tuple) -> str:
    """The file's bytes to its content's key, S3 checking them against DIGEST; the new object's ETag. A file too big
    for one PutObject goes up in parts, each checked by S3, and then must be as the walk found it (its size, mtime,
    ctime, inode): else its content is not DIGEST, and the object is removed."""
    key = content_key(via, digest)
    if path.stat().st_size > SINGLE_PUT_LIMIT:
        client.upload_file(str(path), via.bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        if stamp(os.stat(path)) != walked:
            client.delete_object(Bucket=via.bucket, Key=key)
            raise InputError(f"--stage-via: {path} changed while it was sent; nothing of it is kept: send it again")
        return client.head_object(Bucket=via.bucket, Key=key)["ETag"]
    with open(path, "rb") as body:
        answer = client.put_object(Bucket=via.bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256",
                                   ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode())
    return answer["ETag"]


def file_mode(path: Path) -> int:
    """The file's mode on the hosts: as it is here, without write for group or others (as rsync's default)."""
    return os.stat(path).st_mode & 0o755


def put_manifest(client, via: S3Resource, resource: Resource, objects: tuple[S3Object, ...]) -> None:
    document = json.dumps({"resource": resource.name, "files": [{"path": item.path, "mode": oct(item.mode),
                                                                  "sha256": item.checksum} for item in objects]},
                          separators=(",", ":")).encode()
    client.put_object(Bucket=via.bucket, Key=f"{via.prefix}manifests/{hashlib.sha256(document).hexdigest()}.json",
                      Body=document, ChecksumAlgorithm="SHA256")


def stage_local_resources(via_text: str, resources: list[Resource],
                          walks: dict[str, LocalTree]) -> dict[str, S3Listing]:
    """--stage-via: the local RESOURCES (as the input checks walked them: WALKS, by remote directory) staged into S3."""
    if not resources:
        raise InputError("--stage-via sends the local resources through S3, but no --resource names a local path")
    from botocore.exceptions import BotoCoreError, ClientError

    via = parse_s3_resource("stage-via", via_text)
    cache = ChecksumCache()
    trees = {}
    for resource in resources:
        tree = walks.get(resource.remote_directory) or walk_tree(resource.path, resource.excludes)
        trees[resource] = (tree, checksums(resource, tree, cache))
    try:
        with aws_errors(f"staging into {via.url}"):
            return stage_resources(service_client("s3"), via, trees)
    except (ClientError, BotoCoreError) as error:
        raise InputError(s3_failure(f"staging into {via.url}", error)) from None
    except OSError as error:  # a file removed or unreadable since the walk
        raise InputError(f"--stage-via: {error.filename}: {error.strerror}") from None
