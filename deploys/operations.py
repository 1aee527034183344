"""Operations the deploys share: files written atomically with their final modes, and trees kept by rsync.

Both decide from the HostSnapshot read once before any step, so an unchanged host costs no extra round trip.
Every operation is called with an explicit `name=`: pyinfra would otherwise name it after its arguments,
and an argument may be a secret.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shlex
from io import BytesIO

from gevent.fileobject import FileObjectPosix
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand, operation

from flambe_iac.deploys.facts import HostSnapshot
from flambe_iac.remote_layout import STAGING_DIR
from flambe_iac.secrets_file import HiddenBytes
from flambe_iac.ssh_options import RsyncJob


@operation()
def staged_files(files: list[tuple[str, HiddenBytes, str]], snapshot: HostSnapshot):
    """Write each (PATH, CONTENT, MODE) that differs from the snapshot.

    Uploads land in the 0700 staging directory, take their modes there, then are renamed over their paths:
    readers see the old file or the new one, never a partial one, and never a moment of wider mode.
    """
    changed = [(path, content, mode) for path, content, mode in files
               if not snapshot.matches(path, mode, hashlib.sha256(content.data).hexdigest())]
    if not changed:
        return
    # The snapshot's read made the staging directory; the files' own directories may still be missing.
    parents = sorted({posixpath.dirname(path) for path, _, _ in changed} - {""})
    moves = [f"mkdir -p -m 700 {shlex.quote(parent)}" for parent in parents]
    for path, content, mode in changed:
        upload = posixpath.join(STAGING_DIR, path.replace("/", "%") + ".upload")
        yield FileUploadCommand(BytesIO(content.data), upload)
        moves.append(f"chmod {mode} {shlex.quote(upload)} && mv -f {shlex.quote(upload)} {shlex.quote(path)}")
    yield StringCommand(" && ".join(moves))


@operation()
def synced_tree(destination: str, expected: set, rsync: RsyncJob, failures: dict, snapshot: HostSnapshot):
    """Make DESTINATION hold exactly EXPECTED (see resources.local_tree) by running RSYNC locally, if it does not."""
    if snapshot.trees.get(destination) == expected:
        return
    yield FunctionCommand(_run_rsync, (rsync, failures), {})


def synced_trees(transfers: list[tuple[str, set, RsyncJob]], failures: dict, snapshot: HostSnapshot) -> list:
    """synced_tree for each (remote directory, expected tree, rsync job)."""
    return [synced_tree(name=f"sync {destination}", destination=destination, expected=expected, rsync=rsync,
                        failures=failures, snapshot=snapshot)
            for destination, expected, rsync in transfers]


def _run_rsync(state, host, rsync: RsyncJob, failures: dict) -> bool:
    returncode, stderr = spawn_and_wait(rsync.argv, rsync.environment)
    if returncode != 0:
        failures[host.name] = f"rsync failed ({returncode}): {stderr.strip()[-500:]}"
        return False
    return True


def spawn_and_wait(argv: list[str], environment: dict | None) -> tuple[int, str]:
    """Run ARGV and return (exit code, stderr), letting other hosts go on meanwhile.

    posix_spawn, not gevent's subprocess: that one forks this whole process for every child, which cost ~20 ms per
    host on a busy machine. gevent's os.waitpid and file objects wait cooperatively.
    """
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ if environment is None else environment, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, write_end, 2),
            (os.POSIX_SPAWN_CLOSE, read_end),
        ])
    finally:
        os.close(write_end)
    with FileObjectPosix(read_end, "rb") as errors:
        stderr = errors.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stderr.decode(errors="replace")
