"""Large data, here: file names with any bytes a filesystem allows, the local checksum cache, and a host's copy
checked by hashing only what a transfer wrote. The hosts' commands run for real, in a shell on this machine (the
same GNU find, openssl and sha256sum as on the lab's hosts)."""

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flambe_iac.deploys import operations
from flambe_iac.deploys.operations import Transfer, verify_tree
from flambe_iac.engine.remote_probes import (checksums_command, copy_check_command, listed_paths, parse_checksums,
                                             parse_copy_check)
from flambe_iac.errors import InputError
from flambe_iac.inputs.checksum_cache import ChecksumCache, cached_checksums, sha256_of_file
from flambe_iac.inputs.resources import Resource, checksums
from flambe_iac.inputs.tree_listing import (
    REMOTE_TREE_LISTING,
    REMOTE_TREE_SUMMARY,
    parse_tree_listing,
    parse_tree_summary,
    walk_tree,
)
from flambe_iac.ssh.channel import RemoteResult
from flambe_iac.ssh.policy import RsyncJob

from hostile_names import HOSTILE_NAMES, make_tree


def in_shell(command: str, directory: Path, stdin: bytes = b"", path: str | None = None) -> bytes:
    environment = {**os.environ, "PATH": path} if path else None
    return subprocess.run(["sh", "-c", command], cwd=directory, input=stdin, capture_output=True, check=True,
                          env=environment).stdout


def without_openssl(tmp_path: Path) -> str:
    """A PATH on which the checksum commands find coreutils' sha256sum and no openssl."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("sh", "find", "xargs", "sha256sum", "base64", "sort", "cut"):
        os.symlink(shutil.which(tool), tools / tool)
    return str(tools)


def test_the_hosts_listing_and_summary_of_hostile_names_are_the_local_ones(tmp_path):
    tree = make_tree(tmp_path / "data", HOSTILE_NAMES)
    lines = in_shell(REMOTE_TREE_SUMMARY, tree).decode().split("\n")
    assert parse_tree_summary(lines[0], lines[1:]) == walk_tree(tree).summary
    os.utime(tree / "sub" / "tab\there", ns=(0, 1_700_000_000_123_456_789))
    lines = in_shell(REMOTE_TREE_SUMMARY, tree).decode().split("\n")
    assert parse_tree_summary(lines[0], lines[1:]) == walk_tree(tree).summary
    listed = parse_tree_listing(in_shell(REMOTE_TREE_LISTING, tree))
    assert listed == walk_tree(tree).entries
    assert {"line\nbreak", os.fsdecode(b"not-utf8-\xff\xfe")} <= {entry[1] for entry in listed}


@pytest.mark.parametrize("hasher", ["openssl", "sha256sum"])
def test_hostile_names_hash_to_the_local_checksums(tmp_path, hasher):
    tree = make_tree(tmp_path / "data", HOSTILE_NAMES)
    path = without_openssl(tmp_path) if hasher == "sha256sum" else None
    expected = checksums(Resource("data", tree))
    assert parse_checksums(in_shell(checksums_command("data"), tmp_path, path=path)) == expected
    summary, selected, found = parse_copy_check(in_shell(copy_check_command("data", None), tmp_path, path=path))
    assert summary == walk_tree(tree).summary and found == expected and selected == set(expected)
    some = sorted(expected)[:3] + [name for name in expected if "\n" in name][:1]
    listed = in_shell(copy_check_command("data", 2**40), tmp_path, stdin=listed_paths(some), path=path)
    assert parse_copy_check(listed)[1:] == (set(), {name: expected[name] for name in some})


names = st.binary(min_size=1, max_size=255).filter(lambda name: b"\0" not in name and b"/" not in name
                                                   and name not in (b".", b".."))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(names, min_size=1, max_size=6, unique=True))
def test_any_names_list_and_hash_as_they_are_here(tmp_path_factory, generated):
    root = tmp_path_factory.mktemp("names")
    tree = make_tree(root / "data", generated)
    assert parse_tree_listing(in_shell(REMOTE_TREE_LISTING, tree)) == walk_tree(tree).entries
    lines = in_shell(REMOTE_TREE_SUMMARY, tree).decode().split("\n")
    assert parse_tree_summary(lines[0], lines[1:]) == walk_tree(tree).summary
    assert parse_checksums(in_shell(checksums_command("data"), root)) == checksums(Resource("data", tree))


def counting_hasher(hashed: list):
    def hash_files(function, files):
        files = list(files)
        hashed.extend(files)
        return map(function, files)
    return hash_files


def test_a_rerun_hashes_only_what_changed(tmp_path):
    tree = make_tree(tmp_path / "data", [b"a", b"b", b"c"])
    cache, hashed = ChecksumCache(tmp_path / "home" / ".flambe" / "checksums.sqlite"), []
    first = cached_checksums(tree, tree, walk_tree(tree).files, cache, hash_files=counting_hasher(hashed))
    assert len(hashed) == len(first) == 6
    hashed.clear()
    assert cached_checksums(tree, tree, walk_tree(tree).files, cache, hash_files=counting_hasher(hashed)) == first
    assert hashed == []
    changed = tree / "b"
    before = changed.stat()
    changed.write_bytes(b"X" * before.st_size)  # the same size, and the mtime set back: only the ctime tells
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
    (tree / "sub" / "c").unlink()
    again = cached_checksums(tree, tree, walk_tree(tree).files, cache, hash_files=counting_hasher(hashed))
    assert hashed == [str(changed)] and again["b"] == sha256_of_file(changed)
    assert tree / "sub" / "c" not in cache_paths(cache)


def cache_paths(cache: ChecksumCache) -> set[Path]:
    with sqlite3.connect(cache.path) as database:
        return {Path(os.fsdecode(row[0])) for row in database.execute("SELECT path FROM files")}


def test_the_cache_is_private_and_survives_damage(tmp_path):
    tree = make_tree(tmp_path / "data", [b"a"])
    files = walk_tree(tree).files
    cache = ChecksumCache(tmp_path / "home" / ".flambe" / "checksums.sqlite")
    cached_checksums(tree, tree, files, cache)
    assert cache.path.stat().st_mode & 0o777 == 0o600 and cache.path.parent.stat().st_mode & 0o777 == 0o700
    cache.path.write_bytes(b"not a database at all" * 100)
    hashed = []
    assert cached_checksums(tree, tree, files, cache, hash_files=counting_hasher(hashed))["a"]
    assert len(hashed) == 2 and tree / "a" in cache_paths(cache)


def test_the_cache_never_writes_through_a_symlink(tmp_path):
    tree = make_tree(tmp_path / "data", [b"a"])
    victim = tmp_path / "victim"
    victim.write_bytes(b"the user's file")
    (tmp_path / "home").mkdir()
    os.symlink(victim, tmp_path / "home" / "checksums.sqlite")
    digests = cached_checksums(tree, tree, walk_tree(tree).files, ChecksumCache(tmp_path / "home" / "checksums.sqlite"))
    assert digests["a"] == sha256_of_file(tree / "a")
    assert victim.read_bytes() == b"the user's file"


def test_a_file_that_changes_while_it_is_hashed_is_not_remembered(tmp_path):
    tree = make_tree(tmp_path / "data", [b"a"])
    cache = ChecksumCache(tmp_path / "checksums.sqlite")

    def hash_while_writing(function, files):
        digests = list(map(function, files))
        (tree / "a").write_bytes(b"written during the hash")
        return digests
    cached_checksums(tree, tree, walk_tree(tree).files, cache, hash_files=hash_while_writing)
    assert tree / "a" not in cache_paths(cache) and tree / "sub" / "a" in cache_paths(cache)


class LocalHost:
    """A host stand-in whose commands run in a shell in HOME, as run_remote would run them over SSH."""

    def __init__(self, home: Path):
        self.home, self.hashed = home, []

    def run_remote(self, host, command, stdin=b"", timeout=None):
        result = subprocess.run(["sh", "-c", command], cwd=self.home, input=stdin, capture_output=True)
        if "@checksums" in command:
            self.hashed += sorted(parse_copy_check(result.stdout)[2])
        return RemoteResult(result.returncode, result.stdout, result.stderr)


def copied(tree: Path, home: Path) -> Path:
    destination = home / "resources" / "data"
    destination.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rsync", "-a", "--delete", f"{tree}/", f"{destination}/"], check=True)
    return destination


def transfer_of(tree: Path) -> Transfer:
    return Transfer(destination="resources/data", expected=walk_tree(tree), rsync=None, recorded_as="data",
                    checksums=checksums(Resource("data", tree)))


def test_only_the_files_a_transfer_wrote_are_hashed_on_the_host(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data", HOSTILE_NAMES)
    host = LocalHost(tmp_path / "home")
    monkeypatch.setattr(operations, "run_remote", host.run_remote)
    copied(tree, host.home)
    assert verify_tree(None, transfer_of(tree), changed_since=None) is None
    assert len(host.hashed) == len(transfer_of(tree).checksums)
    time.sleep(1.1)
    clock = int(time.time())  # what the host's snapshot records, before the transfer
    for name in (b"back\\slash", b"line\nbreak"):
        with open(os.path.join(os.fsencode(tree), b"sub", name), "ab") as stream:
            stream.write(b" and more")
    copied(tree, host.home)
    host.hashed.clear()
    assert verify_tree(None, transfer_of(tree), changed_since=clock) is None
    assert sorted(host.hashed) == ["sub/back\\slash", "sub/line\nbreak"]


def test_a_damaged_or_extra_file_fails_the_host(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data", HOSTILE_NAMES)
    host = LocalHost(tmp_path / "home")
    monkeypatch.setattr(operations, "run_remote", host.run_remote)
    copy = copied(tree, host.home)
    damaged = os.path.join(os.fsencode(copy), b"not-utf8-\xff\xfe")
    stamp = os.stat(damaged)
    with open(damaged, "r+b") as stream:
        stream.write(b"X")  # same size, same mtime: only its bytes differ
    os.utime(damaged, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    cause = verify_tree(None, transfer_of(tree), changed_since=None)
    assert cause and "1 file(s)" in cause and "not-utf8-" in cause
    copied(tree, host.home)
    (copy / "planted").write_bytes(b"")
    cause = verify_tree(None, transfer_of(tree), changed_since=None)
    assert cause and "does not hold what was sent" in cause and "planted" in cause


def test_a_tree_that_is_not_there_is_never_hashed_in_its_place(tmp_path):
    """A failed `cd` ends the command: the home is not listed or hashed instead, and the answer is a failure."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "private.txt").write_text("not part of any tree")
    for command in (checksums_command("resources/data"), copy_check_command("resources/data", None)):
        result = subprocess.run(["sh", "-c", command], cwd=home, capture_output=True)
        assert result.returncode != 0 and b"private" not in result.stdout, command


def test_a_copy_a_member_served_that_fails_its_check_is_sent_again_by_contents(tmp_path, monkeypatch):
    """A served copy with a damaged file of the right size and mtime: its own check fails it, it is sent again from
    here with rsync --checksum (a plain rsync would keep the damaged file), and it ends up intact and checked."""
    tree = make_tree(tmp_path / "data", [b"a", b"b"])
    host = LocalHost(tmp_path / "home")
    host.name = "factory-2"
    monkeypatch.setattr(operations, "run_remote", host.run_remote)
    copy = copied(tree, host.home)

    def served_damaged(host_, transfer, notes):
        status = os.stat(copy / "a")
        (copy / "a").write_bytes(b"X" * status.st_size)
        os.utime(copy / "a", ns=(status.st_atime_ns, status.st_mtime_ns))
        return "factory-1", None

    sent_again = []

    def local_rsync(host_, rsync, transfer):
        sent_again.append(rsync.argv)
        by_contents = ["--checksum"] if "--checksum" in rsync.argv else []
        subprocess.run(["rsync", "-a", *by_contents, "--delete", f"{tree}/", f"{copy}/"], check=True)
        return None

    monkeypatch.setattr(operations, "fetched_copy", served_damaged)
    monkeypatch.setattr(operations, "run_rsync", local_rsync)
    transfer = Transfer(destination="resources/data", expected=walk_tree(tree), checksums=checksums(
        Resource("data", tree)), rsync=RsyncJob(["rsync", "-a", "--", f"{tree}/", "host:resources/data/"]))
    causes, notes = {}, []
    assert operations._transfer_tree(None, host, transfer, None, causes, notes) and causes == {}
    assert len(sent_again) == 1 and "--checksum" in sent_again[0]
    assert notes and "from factory-1 failed its check" in notes[0] and "compared by contents" in notes[0]
    assert (copy / "a").read_bytes() == (tree / "a").read_bytes()


def same_size_and_mtime(path: Path, content: bytes) -> None:
    """PATH rewritten with CONTENT (of its size), its mtime set back: only its bytes and its ctime tell."""
    status = os.stat(path)
    assert len(content) == status.st_size
    path.write_bytes(content)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


class LocalDeploy:
    """_transfer_tree against a LocalHost, with a local rsync that, like rsync, skips files of the same size and
    mtime unless asked to compare contents."""

    def __init__(self, tmp_path, monkeypatch, tree: Path):
        self.tree, self.host = tree, LocalHost(tmp_path / "home")
        self.host.name, self.rsyncs = "factory-1", []
        self.copy = copied(tree, self.host.home)
        monkeypatch.setattr(operations, "run_remote", self.host.run_remote)
        monkeypatch.setattr(operations, "read_file", self.read_file)
        monkeypatch.setattr(operations, "run_rsync", self.run_rsync)

    def read_file(self, host, path):
        file = self.host.home / path
        return file.read_bytes() if file.exists() else None

    def run_rsync(self, host, rsync, transfer):
        by_contents = ["--checksum"] if "--checksum" in rsync.argv else []
        self.rsyncs.append(by_contents)
        subprocess.run(["rsync", "-a", *by_contents, "--delete", f"{self.tree}/", f"{self.copy}/"], check=True)

    def record_manifest(self, checksums: dict) -> None:
        manifest = self.host.home / ".flambe" / "cluster.json"
        manifest.parent.mkdir(exist_ok=True)
        manifest.write_text(json.dumps({"resources": {"data": checksums}}))

    def transfer(self, vouched: bool) -> tuple[bool, dict, list]:
        transfer = Transfer(destination="resources/data", expected=walk_tree(self.tree), recorded_as="data",
                            checksums=checksums(Resource("data", self.tree)), vouched=vouched,
                            rsync=RsyncJob(["rsync", "-a", "--", f"{self.tree}/", "host:resources/data/"]))
        causes, notes = {}, []
        done = operations._transfer_tree(None, self.host, transfer, int(time.time()) + 3600, causes, notes)
        return done, causes, notes


def test_a_damaged_copy_left_by_a_failed_run_is_found_and_replaced_by_the_next(tmp_path, monkeypatch):
    """A run that failed its check leaves a file damaged with its size and mtime kept, and no manifest for these
    checksums: the next run hashes that file whatever its ctime, finds it, and sends it again by contents."""
    tree = make_tree(tmp_path / "data", [b"a", b"b"])
    deploy = LocalDeploy(tmp_path, monkeypatch, tree)
    deploy.record_manifest({})  # an earlier run's manifest, for other checksums
    same_size_and_mtime(deploy.copy / "a", b"X" * (tree / "a").stat().st_size)
    done, causes, notes = deploy.transfer(vouched=False)
    assert done and causes == {} and deploy.rsyncs == [[], ["--checksum"]]
    assert "failed its check" in notes[0] and (deploy.copy / "a").read_bytes() == (tree / "a").read_bytes()


def test_a_local_change_that_keeps_size_and_mtime_reaches_the_host(tmp_path, monkeypatch):
    """rsync's quick check skips a file rewritten here with its size and mtime kept; the host's manifest records its
    old checksum, so the check hashes it, finds the old bytes, and it is sent again by contents."""
    tree = make_tree(tmp_path / "data", [b"a", b"b"])
    deploy = LocalDeploy(tmp_path, monkeypatch, tree)
    deploy.record_manifest(checksums(Resource("data", tree)))
    same_size_and_mtime(tree / "b", b"Y" * (tree / "b").stat().st_size)
    done, causes, notes = deploy.transfer(vouched=False)
    assert done and causes == {} and deploy.rsyncs == [[], ["--checksum"]]
    assert (deploy.copy / "b").read_bytes() == (tree / "b").read_bytes()
    assert deploy.host.hashed.count("b") == 2  # listed from the manifest, not by its ctime; then checked again



def test_a_cache_with_damaged_pages_is_done_without(tmp_path):
    tree = make_tree(tmp_path / "data", [bytes([65 + index % 26]) * (index % 40 + 1) for index in range(300)])
    cache = ChecksumCache(tmp_path / "checksums.sqlite")
    expected = cached_checksums(tree, tree, walk_tree(tree).files, cache)
    data = bytearray(cache.path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # the header kept, every page after it garbage
    cache.path.write_bytes(bytes(data))
    assert cached_checksums(tree, tree, walk_tree(tree).files, cache) == expected


def test_an_unreadable_directory_in_a_resource_is_bad_input(tmp_path, monkeypatch):
    """A directory the walk cannot read (a mount root's lost+found, as root needs no permission here: refused by
    the filesystem instead) is a cause in words, not a traceback."""
    tree = make_tree(tmp_path / "data", [b"a"])
    real_scandir = os.scandir

    def refusing(path):
        if str(path).endswith("/sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(InputError, match="cannot read .*/sub: Permission denied"):
        walk_tree(tree)


def test_a_cache_in_a_directory_others_can_write_is_not_used(tmp_path):
    """Another user who can write the cache's directory could swap the file for one of their own digests."""
    tree = make_tree(tmp_path / "data", [b"a"])
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cache = ChecksumCache(shared / "checksums.sqlite")
    hashed = []
    cached_checksums(tree, tree, walk_tree(tree).files, cache, hash_files=counting_hasher(hashed))
    assert not cache.path.exists() and len(hashed) == 2


def test_a_host_whose_sort_fails_never_matches_even_an_empty_tree(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    tools = tmp_path / "no-sort"
    tools.mkdir()
    for tool in ("sh", "find", "sha256sum", "cut", "base64"):
        os.symlink(shutil.which(tool), tools / tool)
    result = subprocess.run(["sh", "-c", REMOTE_TREE_SUMMARY], cwd=empty, capture_output=True,
                            env={**os.environ, "PATH": str(tools)})
    lines = result.stdout.decode().split("\n")
    assert parse_tree_summary(lines[0], lines[1:]) != walk_tree(empty).summary
    lines = in_shell(REMOTE_TREE_SUMMARY, empty).decode().split("\n")
    assert parse_tree_summary(lines[0], lines[1:]) == walk_tree(empty).summary
