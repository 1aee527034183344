"""Operations the deploys share: files written atomically with their final modes, and trees kept by rsync.

Both decide from the HostSnapshot read once before any step, so an unchanged host costs no extra round trip.
Every operation is called with an explicit `name=`: pyinfra would otherwise name it after its arguments,
and an argument may be a secret. A failure records its cause in words in CAUSES[host name], for the report.

Why not pyinfra's `files.put` and `files.rsync`: `files.put` uploads over SFTP (hosts without an SFTP subsystem
get nothing) and chmods only after the upload; `files.rsync` does not hold ssh to the one key given, and sets no
ConnectTimeout.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import shlex
import tarfile
from dataclasses import dataclass, replace
from typing import Callable

from pyinfra.api import FunctionCommand, operation

from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.engine.fan_out import RSYNC_CONNECTION_LOST, WRITES_STOPPED, FanOut, Hop
from flambe_iac.remote_layout import MANIFEST, recorded_resources
from flambe_iac.engine.remote_probes import copy_check_command, inside_home, listed_paths, parse_copy_check
from flambe_iac.errors import describe_exception
from flambe_iac.inputs.resources import Resource
from flambe_iac.inputs.secrets_file import HiddenBytes
from flambe_iac.inputs.tree_listing import REMOTE_TREE_LISTING, LocalTree, parse_tree_listing
from flambe_iac.ssh.channel import RemoteCommandError, read_file, run_remote
from flambe_iac.ssh.policy import RsyncJob
from flambe_iac.ssh.processes import spawn_and_wait

UPLOAD_TIMEOUT = 600.0
VERIFY_TIMEOUT = 6 * 3600.0


def host_function(function: Callable, *arguments, causes: dict) -> FunctionCommand:
    """FUNCTION(state, host, *ARGUMENTS) as a pyinfra command. pyinfra only logs a callback's exception and fails the
    operation without a word; here the exception becomes the host's cause, in words."""
    def recorded(state, host, *arguments) -> bool:
        try:
            return function(state, host, *arguments)
        except Exception as error:  # an error of ours: this host fails, and the report says with what
            causes[host.name] = f"stopped on an unexpected error: {describe_exception(error)}"
            return False
    return FunctionCommand(recorded, arguments, {})


def ran(host, command: str, causes: dict, unfinished: str, failed: str | None = None, **options):
    """COMMAND's result on HOST (run_remote's OPTIONS: stdin, timeout), or None with the host's cause in CAUSES:
    "UNFINISHED: why" when it could not run or finish (no session, its deadline, the connection); given FAILED,
    "FAILED: its reason" when it exited non-zero. The one way a step runs a command whose failure fails its host."""
    try:
        result = run_remote(host, command, **options)
    except RemoteCommandError as error:
        causes[host.name] = f"{unfinished}: {error}"
        return None
    if failed is not None and result.exit_code != 0:
        causes[host.name] = f"{failed}: {result.reason}"
        return None
    return result


@operation()
def staged_files(files: list[tuple[str, HiddenBytes, str]], snapshot: HostSnapshot, staging: str, causes: dict):
    """Write each (PATH, CONTENT, MODE) that differs from the snapshot, in one round trip.

    The contents travel as a tar stream on the exec channel's stdin (no SFTP, nothing on a command line) into
    this run's 0700 staging directory, take their modes there, then are renamed over their paths: readers see
    the old file or the new one, never a partial one, and never a moment of wider mode. A symlinked PATH stays a
    symlink: its target is replaced, through a rename in the target's own directory.
    """
    changed = [(path, content, mode) for path, content, mode in files
               if not snapshot.matches(path, mode, hashlib.sha256(content.data).hexdigest())]
    if changed:
        yield host_function(_upload_and_install, changed, snapshot, staging, causes, causes=causes)


def _upload_and_install(state, host, files: list, snapshot: HostSnapshot, staging: str, causes: dict) -> bool:
    try:
        command = install_command(files, snapshot, staging)
    except UnwritableLink as error:
        causes[host.name] = str(error)
        return False
    written = f"writing {', '.join(path for path, _, _ in files)} failed"
    return ran(host, command, causes, "upload failed", written, stdin=tar_stream(files),
               timeout=UPLOAD_TIMEOUT) is not None


class UnwritableLink(Exception):
    pass


def tar_stream(files: list[tuple[str, HiddenBytes, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for index, (_, content, mode) in enumerate(files):
            entry = tarfile.TarInfo(f"{index}.upload")
            entry.size, entry.mode = len(content.data), int(mode, 8)
            archive.addfile(entry, io.BytesIO(content.data))
    return buffer.getvalue()


def install_command(files: list[tuple[str, HiddenBytes, str]], snapshot: HostSnapshot, staging: str) -> str:
    """Make STAGING (0700 from the moment it exists, by the umask), unpack the tar stream into it with each file's
    final mode (-p: unreachable by others inside STAGING), put each file in place by a rename, and remove STAGING
    again: a run that ends normally leaves nothing behind. Few processes: each costs a busy host a few ms."""
    quoted_staging = shlex.quote(staging)
    steps = ["umask 077", f"mkdir -p {quoted_staging}",
             f"tar -x -m -p -f - -C {quoted_staging} --no-same-owner"]
    parents = sorted({posixpath.dirname(path) for path, _, _ in files if path not in snapshot.links} - {""})
    steps += [f"mkdir -p {shlex.quote(parent)}" for parent in parents]
    for index, (path, _, _) in enumerate(files):
        upload = shlex.quote(f"{staging}/{index}.upload")
        if path in snapshot.links:
            target, writable = snapshot.links[path]
            if not writable:
                raise UnwritableLink(f"{path} is a symlink to {target}, not writable")
            temporary = f".{posixpath.basename(target)}.flambe-{posixpath.basename(staging)}"
            beside = shlex.quote(posixpath.join(posixpath.dirname(target), temporary))
            steps.append(f"mv -f {upload} {beside} && mv -f {beside} {shlex.quote(target)}")
        else:
            steps.append(f"mv -f {upload} {shlex.quote(path)}")
    steps.append(f"rm -rf {quoted_staging}")
    # On any failure the uploads are removed: nothing half-done stays behind, and no final path was touched
    # by the file that failed.
    return " && ".join(steps) + f" || {{ status=$?; rm -rf {quoted_staging}; exit $status; }}"


@dataclass(frozen=True)
class Transfer:
    """One tree for one member: where it goes, what it should hold, how it gets there, and how it is checked."""

    destination: str  # relative to the home
    expected: LocalTree  # what the copy must hold
    rsync: RsyncJob  # the direct transfer, from this machine
    checksums: dict[str, str] | None = None  # sha256 by path, for resources: checked after every transfer
    recorded_as: str = ""  # the resource's name in the manifest
    recorded: RecordedResources | None = None  # what the host's manifest records, shared by the member's trees
    vouched: bool = True  # the host's manifest is the one this run writes: its copy was checked against CHECKSUMS
    writes_stopped: Callable[[], str | None] = lambda: None  # why no rsync may start any more (the lock is lost)
    fan_out: FanOut | None = None  # None: directly from this machine
    member: str = ""  # the member's id, in the fan-out
    hop: Hop | None = None  # how a serving member reaches this one
    first_copy: bool = False  # see is_first_copy


@operation()
def synced_tree(transfer: Transfer, causes: dict, notes: list, snapshot: HostSnapshot):
    """Make the host's copy hold exactly what it should, if it does not: from the member that serves it, or by rsync
    from here; then check it against the checksums. A copy whose listing matches is left alone only if the host's
    manifest vouches for these checksums: a file changed with its size and mtime kept (here, or on the host by a
    failed run) matches the listing too."""
    listed_the_same = snapshot.trees.get(transfer.destination) == transfer.expected.summary
    if listed_the_same and (transfer.checksums is None or transfer.vouched):
        if transfer.fan_out is not None:
            transfer.fan_out.holds(transfer.destination, transfer.member)
        return
    # Files written in the host's clock tick of the read, or a second before, are checked too.
    changed_since = None if snapshot.clock is None else snapshot.clock - 2
    if is_first_copy(transfer, snapshot):
        transfer = replace(transfer, first_copy=True)
    yield host_function(_transfer_tree, transfer, changed_since, causes, notes, causes=causes)


def is_first_copy(transfer: Transfer, snapshot: HostSnapshot) -> bool:
    """The member had no copy of a checked tree that members serve one another: its files may be written in place as
    they arrive, so that the members it serves take them while they grow (engine/fan_out.py), as nothing reads a copy
    that was not there. Checked trees only: the last pass then trusts sizes, and the check reads every byte."""
    return (transfer.fan_out is not None and transfer.checksums is not None
            and snapshot.trees.get(transfer.destination) is None)


def synced_trees(transfers: list[Transfer], causes: dict, notes: list, snapshot: HostSnapshot) -> list:
    return [synced_tree(name=f"sync {transfer.destination}", transfer=transfer, causes=causes, notes=notes,
                        snapshot=snapshot)
            for transfer in transfers]


def _transfer_tree(state, host, transfer: Transfer, changed_since: int | None, causes: dict, notes: list) -> bool:
    """Fetch the copy, let the members this one serves take theirs from it at once, then check it. Each member checks
    its own copy: one that fails its check after a member served it is sent again from here, compared by contents
    (a damaged file may have the right size and mtime), and checked again."""
    fan_out = transfer.fan_out
    if fan_out is not None and transfer.hop is None:  # from here; a served member is said receiving by its take
        in_place = transfer.first_copy and fan_out.serves(transfer.destination, transfer.member)
        transfer = replace(transfer, rsync=transfer.rsync.writing_in_place()) if in_place else transfer
        fan_out.receiving(transfer.destination, transfer.member, in_place)
    served_by, cause = fetched_copy(host, transfer, notes)
    if fan_out is not None:
        if cause is None:
            fan_out.holds(transfer.destination, transfer.member)
        else:
            fan_out.lacks(transfer.destination, transfer.member, f"its own copy failed: {cause}")
    if cause is None and transfer.checksums is not None:
        unvouched = [] if transfer.vouched else unvouched_files(host, transfer)
        since = changed_since if unvouched is not None else None
        cause = verify_tree(host, transfer, since, unvouched or [])
        if cause is not None:
            notes.append(f"the copy of ~/{transfer.destination} from {served_by or 'here'} failed its check "
                         f"({cause}): sent again from here, compared by contents")
            cause = (run_rsync(host, transfer.rsync.comparing_contents(), transfer)
                     or verify_tree(host, transfer, since, unvouched or []))
    if cause is not None:
        causes[host.name] = cause
        return False
    return True


class RecordedResources:
    """The checksums a host's manifest records, read at most once for all of the member's trees: from MANIFEST (its
    bytes, as the state read found them; b"" if it found none), else from the host when first asked."""

    def __init__(self, manifest: bytes | None = None):
        self.read = manifest is not None
        self.resources = recorded_resources(manifest) if manifest is not None else None

    def of(self, host) -> dict | None:
        if not self.read:
            self.read, self.resources = True, recorded_resources(read_file(host, MANIFEST) or b"")
        return self.resources


def unvouched_files(host, transfer: Transfer) -> list[str] | None:
    """The files whose checksums the host's manifest does not record as these: to be hashed whatever their ctime.
    None: the manifest is missing or unreadable, so every file is."""
    recorded = (transfer.recorded or RecordedResources()).of(host)
    files = recorded.get(transfer.recorded_as) if recorded is not None else None
    if not isinstance(files, dict):
        return None
    return [path for path, digest in transfer.checksums.items() if files.get(path) != digest]


def fetched_copy(host, transfer: Transfer, notes: list) -> tuple[str | None, str | None]:
    """(the member that served the copy, or None for this machine; None, or why it failed)."""
    if transfer.hop is None:
        return None, run_rsync(host, transfer.rsync, transfer)
    server, returncode, stderr = transfer.fan_out.take(transfer.destination, transfer.member, transfer.hop, notes,
                                                       transfer.first_copy)
    if server is None:  # after a server that failed, what it forwarded is compared by contents
        return None, run_rsync(host, transfer.rsync.comparing_contents(), transfer)
    if returncode == 0:
        return server, None
    if returncode == WRITES_STOPPED:
        return server, stderr
    return server, f"relay hop from {server}: " + rsync_failure(host, transfer, returncode, stderr)


def verify_tree(host, transfer: Transfer, changed_since: int | None, also: list[str] = ()) -> str | None:
    """None if the host's copy holds what was sent: every entry as listed here, and each file written since the
    host's time CHANGED_SINCE (all of them if None), and each file in ALSO, with the sha256 the manifest records;
    else what differs. Every other file is one a checked run wrote, as the host's manifest vouches (`flambe-deploy
    status` hashes them all)."""
    destination = transfer.destination
    try:
        result = run_remote(host, copy_check_command(destination, changed_since), stdin=listed_paths(also),
                            timeout=VERIFY_TIMEOUT)
    except RemoteCommandError as error:
        return f"could not check ~/{destination}: {error}"
    if result.exit_code != 0:
        return f"could not check ~/{destination}: {result.reason}"
    try:
        summary, selected, found = parse_copy_check(result.stdout)
    except ValueError as error:
        return f"could not check ~/{destination}: the host's answer is malformed ({error})"
    if summary != transfer.expected.summary:
        differing = differing_entries(host, destination, transfer.expected.entries)
        if differing:
            return differing
    unhashed = sorted((selected | set(also)) - set(found))
    if unhashed:
        return f"could not check ~/{destination}: no checksum for {len(unhashed)} file(s) (first: {unhashed[0]})"
    differing = sorted(path for path in found if found[path] != transfer.checksums.get(path))
    if not differing:
        return None
    return (f"integrity check failed: {len(differing)} file(s) in ~/{destination} differ from the checksums the "
            f"manifest records (first: {differing[0]})")


def differing_entries(host, destination: str, expected: set) -> str | None:
    """What the host's full listing of DESTINATION shows that EXPECTED does not (mtimes to the second: a filesystem
    with coarser times than this one's is not a difference), or None."""
    try:
        result = run_remote(host, f"cd {inside_home(destination)} && {REMOTE_TREE_LISTING}", timeout=VERIFY_TIMEOUT)
        entries = parse_tree_listing(result.stdout) if result.exit_code == 0 else None
    except (RemoteCommandError, ValueError) as error:
        return f"could not list ~/{destination}: {error}"
    if entries is None:
        return f"could not list ~/{destination}: {result.reason}"
    if entries == expected:
        return None
    differing = sorted({entry[1] for entry in entries ^ expected})
    return (f"integrity check failed: ~/{destination} does not hold what was sent ({len(differing)} path(s) differ, "
            f"first: {differing[0]})")


RSYNC_EXIT_MEANINGS = {
    3: "a destination path could not be used", 5: "the remote rsync could not start", 10: "socket I/O error",
    11: "file I/O error on the host (is its disk full?)", 12: "the connection dropped mid-transfer",
    23: "some files could not be transferred", 30: "the host stopped answering", 35: "the host stopped answering",
    127: "rsync is not installed on the host: install rsync", 255: "ssh failed",
}


def run_rsync(host, rsync: RsyncJob, transfer: Transfer) -> str | None:
    """The direct transfer, retried once if the connection dropped; None on success, else the cause. None is started
    once the deploy lock is lost: the fence holds within an operation too."""
    stopped = transfer.writes_stopped()
    if stopped:
        return stopped
    returncode, stderr = spawn_and_wait(rsync.argv, rsync.environment)
    if returncode in RSYNC_CONNECTION_LOST:
        returncode, stderr = spawn_and_wait(rsync.argv, rsync.environment)
    return None if returncode == 0 else rsync_failure(host, transfer, returncode, stderr)


def rsync_failure(host, transfer: Transfer, returncode: int, stderr: str) -> str:
    """The cause of a failed rsync into HOST, in words, even when rsync's own message was lost."""
    return (no_space_left(host, transfer.destination, transfer.expected.entries) if returncode == 11 else None) \
        or describe_rsync_failure(returncode, stderr)


def no_space_left(host, destination: str, expected: set) -> str | None:
    """When rsync's own message was lost with its connection: does the tree fit on the host's disk at all?"""
    needed = sum(entry[2] for entry in expected if entry[0] == "f")
    try:
        result = run_remote(host, f"df -Pk {shlex.quote(posixpath.dirname(destination) or '.')} | tail -n 1",
                            timeout=30)
        free = int(result.stdout.split()[3]) * 1024
    except (RemoteCommandError, IndexError, ValueError):
        return None
    if free >= needed:
        return None
    return (f"No space left on device: ~/{destination} needs {needed / 1e6:.1f} MB and its disk on the host has "
            f"{free / 1e6:.1f} MB free")


def describe_rsync_failure(returncode: int, stderr: str) -> str:
    meaning = RSYNC_EXIT_MEANINGS.get(returncode, "see rsync's exit codes")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # rsync's own summary lines say less than what ssh or the receiver said before them.
    telling = [line for line in lines if not line.startswith("rsync error:")
               and "connection unexpectedly closed" not in line] or lines
    detail = "; ".join(telling[-2:])[-400:]
    retried = " (after one retry)" if returncode in RSYNC_CONNECTION_LOST else ""
    return f"rsync failed{retried} with exit code {returncode}, {meaning}" + (f": {detail}" if detail else "")


def transfers(context, member, trees: list[Resource], relayed: bool = True, vouched: bool = True,
              manifest: bytes | None = None) -> list[Transfer]:
    """How each tree gets to one member in CONTEXT's run, and how its copy is checked (VOUCHED: see `manifest_vouches`; MANIFEST:
    the host's manifest as its state read found it, if that read it)."""
    address = context.plan.address(member)
    fan_out = context.fan_out if relayed else None
    recorded = RecordedResources(manifest)

    def served(tree: Resource) -> bool:
        return fan_out is not None and fan_out.server[tree.remote_directory, member.id] is not None
    return [Transfer(
        destination=tree.remote_directory,
        expected=context.local_trees[tree.remote_directory],
        rsync=context.policy.rsync_job(tree.rsync_source, f"{tree.remote_directory}/", address, tree.excludes),
        checksums=context.resource_checksums.get(tree.name) if tree in context.plan.resources else None,
        recorded_as=tree.name,
        recorded=recorded,
        vouched=vouched,
        writes_stopped=context.writes_stopped,
        fan_out=fan_out,
        member=member.id,
        hop=Hop(tree.remote_directory, context.plan.cluster.ssh_user, member.private_ip,
                context.plan.request.connect_timeout, tree.excludes) if served(tree) else None,
    ) for tree in trees]
