"""Resources: `NAME=PATH` pairs, checked locally, and the listing and checksums that say what a host should hold."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from flambe_iac.errors import InputError
from flambe_iac.inputs.checksum_cache import ChecksumCache, cached_checksums
from flambe_iac.names import check_tree_name
from flambe_iac.inputs.s3_location import is_s3_location
from flambe_iac.inputs.tree_listing import LocalTree, walk_tree


@dataclass(frozen=True)
class Resource:
    """A local file or directory kept identical in a directory of every host's home (PARENT/NAME/)."""

    name: str
    path: Path
    parent: str = "resources"
    excludes: tuple[str, ...] = ()  # names left out at any depth, e.g. ".git"

    @property
    def rsync_source(self) -> str:
        """A directory's contents, or a single file, to go into ~/PARENT/NAME/."""
        return f"{self.path}/" if self.path.is_dir() else str(self.path)

    @property
    def remote_directory(self) -> str:
        return f"{self.parent}/{self.name}"


def parse_resources(pairs: list[str], walks: dict | None = None) -> list[Resource]:
    """The resources PAIRS name, checked; each one's walk goes into WALKS (Resource -> LocalTree), if given, so
    that a tree of a million files is walked once."""
    resources: dict[str, Resource] = {}
    for pair in pairs:
        name, separator, path_text = pair.partition("=")
        if not separator or not name or not path_text:
            raise InputError(f"--resource {pair!r}: write it as NAME=PATH, for example --resource data=./data")
        if is_s3_location(path_text):
            raise InputError(f"--resource {pair}: an S3 resource is pulled onto the hosts by flambe-deploy; here, "
                             "give a local path")
        resource = Resource(check_resource_name(name), Path(path_text).expanduser().resolve())
        if name in resources:
            raise InputError(f"--resource: the name {name!r} is given twice; each resource needs its own name")
        if not resource.path.exists():
            raise InputError(f"--resource {name}={path_text}: no such file or directory")
        if not os.access(resource.path, os.R_OK):
            raise InputError(f"--resource {name}={path_text}: not readable")
        walk = walk_tree(resource.path, resource.excludes)
        refuse_special_files(resource, walk, f"--resource {name}={path_text}")
        if walks is not None:
            walks[resource] = walk
        resources[name] = resource
    return list(resources.values())


def check_resource_name(name: str) -> str:
    return check_tree_name(name, "resource")


def refuse_special_files(tree: Resource, walk: LocalTree, what: str) -> None:
    """Only files, directories and symlinks travel: a FIFO would hang the checksums, a device or a socket has no
    meaning on another host. Found here, before anything connects."""
    for path, mode in walk.special:
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")
        raise InputError(f"{what}: {tree.path / path} is {kind}; a resource holds only files, directories and "
                         "symlinks")


SECRET_PLACES = ("~/.ssh", "~/.aws", "~/.flambe", "~/.config/gcloud", "~/.azure", "~/.kube", "~/.docker", "~/.gnupg",
                 "~/.config/gh", "~/.netrc", "~/.git-credentials", "~/.pypirc")


def refuse_secrets(trees: list[Resource], key: Path, what: str = "resource", own_cache: Path | None = None,
                   walks: dict | None = None) -> None:
    """No tree lies in or holds a place where credentials live (SECRET_PLACES; flambe's own extension checkouts in
    OWN_CACHE may lie in ~/.flambe), none is or holds the directory of KEY, and no file in a tree has KEY's bytes: the user's key and credentials never leave
    this machine, whatever a runnable file or a --resource names. WALKS: as `parse_resources` fills it."""
    walks = {} if walks is None else walks
    key = key.expanduser().resolve()
    key_bytes = key.read_bytes()
    places = [Path(place).expanduser().resolve() for place in SECRET_PLACES]
    for tree in trees:
        path = tree.path.resolve()
        for place in places:  # flambe's own checkouts of git extensions live in ~/.flambe/cache
            if (path == place or place in path.parents) and not (own_cache and own_cache.resolve() in path.parents):
                raise InputError(f"{what} {tree.name}: {tree.path} lies in {place}, where keys and credentials live; "
                                 "nothing there is ever sent to the hosts")
        for place in [*places, key.parent]:  # the key's neighbours are keys too; beside it, a tree is fine
            if (path == place or path in place.parents) and not _excluded(tree, place):
                raise InputError(f"{what} {tree.name}: {tree.path} holds {place}, where keys and credentials live; "
                                 "give a directory that does not hold it")
        base = tree.path if tree.path.is_dir() else tree.path.parent
        if tree not in walks:
            walks[tree] = walk_tree(tree.path, tree.excludes)
        for path, (size, *_) in walks[tree].files:
            if abs(size - len(key_bytes)) <= 64 and is_key_copy(base / path, key_bytes):
                raise InputError(f"{what} {tree.name}: {base / path} is your SSH key (--key); it never leaves this "
                                 "machine")


def is_key_copy(file: Path, key_bytes: bytes) -> bool:
    """FILE holds the key, whatever its line endings or whitespace around it."""
    return b"".join(file.read_bytes().split()) == b"".join(key_bytes.split())


def _excluded(tree: Resource, place: Path) -> bool:
    return place != tree.path.resolve() and any(part in tree.excludes
                                                for part in place.relative_to(tree.path.resolve()).parts)


def checksums(resource: Resource, tree: LocalTree | None = None, cache: ChecksumCache | None = None,
              **threads) -> dict[str, str]:
    """sha256 of every file, by path inside the resource: recorded in ~/.flambe/cluster.json. TREE: the resource as
    `walk_tree` found it, if it was walked already. Only files CACHE does not hold as they are now are hashed;
    THREADS (`in_thread`, `hash_files`) say where the work runs (see `cached_checksums`)."""
    tree = walk_tree(resource.path, resource.excludes) if tree is None else tree
    base = resource.path if resource.path.is_dir() else resource.path.parent
    return cached_checksums(resource.path, base, tree.files, cache, **threads)
