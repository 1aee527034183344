"""Resources: `NAME=PATH` pairs, checked locally, and the listing and checksums that say what a host should hold."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from flambe_iac.errors import InputError
from flambe_iac.inputs.checksum_cache import ChecksumCache, cached_checksums
from flambe_iac.inputs.names import check_tree_name

# One entry of a tree: ("f", path, size, mtime) for a file, ("d", path) for a directory, ("l", path, target).
# `local_tree` lists a tree here; REMOTE_TREE_LISTING, run inside a directory on a host, lists it as NUL-separated
# fields (a name may hold any byte but NUL and "/") that `parse_tree_listing` reads. The two agree entry for entry.
# Names are str, with the bytes that are not UTF-8 kept by os.fsdecode's surrogateescape: lossless both ways.
TreeEntry = tuple

REMOTE_TREE_LISTING = (r"find . -mindepth 1 \( -type f -printf 'f\0%P\0%s\0%T@\0' \) "
                       r"-o \( -type d -printf 'd\0%P\0' \) -o \( -type l -printf 'l\0%P\0%l\0' \)")
_FIELDS_AFTER_KIND = {b"f": 3, b"d": 1, b"l": 2}


def parse_tree_listing(data: bytes) -> set[TreeEntry]:
    """What REMOTE_TREE_LISTING printed; anything else is a ValueError."""
    fields = data.split(b"\0")
    if fields[-1] != b"":
        raise ValueError("the tree listing was cut short")
    entries, index = set(), 0
    while index < len(fields) - 1:
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


def parse_resources(pairs: list[str]) -> list[Resource]:
    resources: dict[str, Resource] = {}
    for pair in pairs:
        name, separator, path_text = pair.partition("=")
        if not separator or not name or not path_text:
            raise InputError(f"--resource {pair!r}: write it as NAME=PATH, for example --resource data=./data")
        resource = Resource(check_resource_name(name), Path(path_text).expanduser().resolve())
        if name in resources:
            raise InputError(f"--resource: the name {name!r} is given twice; each resource needs its own name")
        if not resource.path.exists():
            raise InputError(f"--resource {name}={path_text}: no such file or directory")
        if not os.access(resource.path, os.R_OK):
            raise InputError(f"--resource {name}={path_text}: not readable")
        refuse_special_files(resource, f"--resource {name}={path_text}")
        resources[name] = resource
    return list(resources.values())


def check_resource_name(name: str) -> str:
    return check_tree_name(name, "resource")


def refuse_special_files(tree: Resource, what: str) -> None:
    """Only files, directories and symlinks travel: a FIFO would hang the checksums, a device or a socket has no
    meaning on another host. Found here, before anything connects."""
    paths = [tree.path] if not tree.path.is_dir() else (
        Path(directory, name) for directory, subdirectories, files in _walk(tree) for name in subdirectories + files)
    for path in paths:
        mode = path.lstat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")
            raise InputError(f"{what}: {path} is {kind}; a resource holds only files, directories and symlinks")


SECRET_PLACES = ("~/.ssh", "~/.aws", "~/.flambe", "~/.config/gcloud", "~/.azure", "~/.kube", "~/.docker", "~/.gnupg",
                 "~/.config/gh", "~/.netrc", "~/.git-credentials", "~/.pypirc")


def refuse_secrets(trees: list[Resource], key: Path, what: str = "resource", own_cache: Path | None = None) -> None:
    """No tree lies in or holds a place where credentials live (SECRET_PLACES; flambe's own extension checkouts in
    OWN_CACHE may lie in ~/.flambe), none is or holds the directory of KEY, and no file in a tree has KEY's bytes: the user's key and credentials never leave
    this machine, whatever a runnable file or a --resource names."""
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
        for file in _files(tree):
            if is_key_copy(file, key_bytes):
                raise InputError(f"{what} {tree.name}: {file} is your SSH key (--key); it never leaves this machine")


def resource_files(resource: Resource) -> list[Path]:
    return sorted(_files(resource))


def files_in(resource: Resource, entries: set[TreeEntry]) -> list[Path]:
    """The files `resource_files` lists, from the entries `local_tree` listed: one walk of a large tree, not two."""
    base = resource.path.parent if resource.path.is_file() else resource.path
    return sorted(base / entry[1] for entry in entries if entry[0] == "f")


def is_key_copy(file: Path, key_bytes: bytes) -> bool:
    """FILE holds the key, whatever its line endings or whitespace around it."""
    if abs(file.stat().st_size - len(key_bytes)) > 64:
        return False
    return b"".join(file.read_bytes().split()) == b"".join(key_bytes.split())


def _excluded(tree: Resource, place: Path) -> bool:
    return place != tree.path.resolve() and any(part in tree.excludes
                                                for part in place.relative_to(tree.path.resolve()).parts)


def _files(tree: Resource):
    """Every regular file a tree sends (symlinks travel as links, never as the bytes they point to)."""
    if tree.path.is_file():
        yield tree.path
        return
    for directory, _, names in _walk(tree):
        for name in names:
            path = Path(directory, name)
            if name not in tree.excludes and path.is_file() and not path.is_symlink():
                yield path


def local_tree(resource: Resource) -> set[TreeEntry]:
    """What ~/resources/NAME/ holds once rsync -a has copied the resource (mtimes to the second)."""
    if resource.path.is_file():
        stat = resource.path.stat()
        return {("f", resource.path.name, stat.st_size, whole_seconds(stat.st_mtime_ns))}
    entries: set[TreeEntry] = set()
    for directory, subdirectories, files in _walk(resource):
        for name in subdirectories + [name for name in files if name not in resource.excludes]:
            full = Path(directory, name)
            relative = str(full.relative_to(resource.path))
            if full.is_symlink():
                entries.add(("l", relative, os.readlink(full)))
            elif full.is_dir():
                entries.add(("d", relative))
            else:
                stat = full.stat()
                entries.add(("f", relative, stat.st_size, whole_seconds(stat.st_mtime_ns)))
    return entries


def whole_seconds(nanoseconds: int) -> int:
    """An mtime as the hosts' listing gives it: its whole seconds, the fraction cut off (in integers: a float
    rounds x.9999999995 up to x+1)."""
    return nanoseconds // 10**9 if nanoseconds >= 0 else -(-nanoseconds // 10**9)


def checksums(resource: Resource, files: list[Path] | None = None, cache: ChecksumCache | None = None,
              **threads) -> dict[str, str]:
    """sha256 of every file, by path inside the resource: recorded in ~/.flambe/cluster.json. FILES: the resource's
    files as `resource_files` lists them, if they were listed already. Only files CACHE does not hold as they are
    now are hashed; THREADS (`in_thread`, `hash_files`) say where the work runs (see `cached_checksums`)."""
    files = resource_files(resource) if files is None else files
    base = resource.path.parent if resource.path.is_file() else resource.path
    digests = cached_checksums(resource.path, files, cache, **threads)
    return {str(path.relative_to(base)): digests[path] for path in files}


def _walk(resource: Resource):
    for directory, subdirectories, files in os.walk(resource.path):
        subdirectories[:] = [name for name in subdirectories if name not in resource.excludes]
        yield directory, subdirectories, files
