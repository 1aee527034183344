"""Operations the deploys share: a file written atomically with its final mode, and a tree kept in sync by rsync.

Every operation is called with an explicit `name=`: pyinfra would otherwise name it after its arguments,
and an argument may be a secret.
"""

from __future__ import annotations

import hashlib
import posixpath
import shlex
import subprocess
from io import BytesIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand, operation

from flambe_iac.deploys.facts import FileBytes, FileState, TreeListing
from flambe_iac.remote_layout import STAGING_DIR
from flambe_iac.secrets_file import HiddenBytes
from flambe_iac.ssh_options import RsyncJob


@operation()
def staged_file(path: str, content: HiddenBytes, mode: str):
    """Write PATH with CONTENT and MODE, or leave it if it already matches."""
    yield from _staged_upload(path, content, mode)


@operation()
def edited_file(path: str, edit, mode: str):
    """Rewrite PATH as EDIT(current bytes) with MODE, if that changes anything. For files that hold no secret."""
    current = host.get_fact(FileBytes, path=path)
    yield from _staged_upload(path, HiddenBytes(edit(current or b"")), mode)


def _staged_upload(path: str, content: HiddenBytes, mode: str):
    """The upload lands in the 0700 staging directory, takes its mode there, then is renamed over PATH:
    readers see the old file or the new one, never a partial one, and never a moment of wider mode."""
    wanted = (mode, hashlib.sha256(content.data).hexdigest())
    if host.get_fact(FileState, path=path) == wanted:
        return
    staging = shlex.quote(STAGING_DIR)
    parent = posixpath.dirname(path)
    make_parent = f" && mkdir -p -m 700 {shlex.quote(parent)}" if parent else ""
    yield StringCommand(f"mkdir -p -m 700 {staging} && chmod 700 {staging}{make_parent}")
    upload = posixpath.join(STAGING_DIR, posixpath.basename(path) + ".upload")
    yield FileUploadCommand(BytesIO(content.data), upload)
    yield StringCommand(f"chmod {mode} {shlex.quote(upload)} && mv -f {shlex.quote(upload)} {shlex.quote(path)}")


@operation()
def synced_tree(destination: str, expected: set, rsync: RsyncJob, failures: dict):
    """Make DESTINATION hold exactly EXPECTED (see TreeListing) by running RSYNC locally, if it does not."""
    if host.get_fact(TreeListing, path=destination) == expected:
        return
    yield FunctionCommand(_run_rsync, (rsync, failures), {})


def _run_rsync(state, host, rsync: RsyncJob, failures: dict) -> bool:
    result = subprocess.run(rsync.argv, env=rsync.environment, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True)
    if result.returncode != 0:
        failures[host.name] = f"rsync failed ({result.returncode}): {result.stderr.strip()[-500:]}"
        return False
    return True
