"""On a host: make ~/DESTINATION hold exactly the objects this machine listed under an S3 prefix, each checked.

Sent to every host with s3_client.py beside it, run by its python3 (3.9 or newer, standard library only: why, in
docs/s3.md). The job comes as JSON on stdin: names, sizes, checksums. S3 is read with the instance role
alone (IMDSv2), never with credentials from the environment, a file or an argument. Each object is fetched once
with If-Match (the version listed, or a failure), hashed as it streams, and renamed into place only once every
object of the prefix has passed its check.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from s3_client import PullError, Retry, S3Client, raise_for_status  # sent beside this file

CHUNK = 1 << 20
ATTEMPTS = 5  # for 500, 503 (SlowDown), RequestTimeout and dropped connections
WORKERS = 8
LOCK_WAIT = 120.0  # an earlier pull of the same resource, cut off with its deploy, stops within this
STAGING = ".flambe-s3-partial"  # inside the resource's directory: on its filesystem, whatever is mounted there
ALGORITHMS = {"sha256": 64, "md5": 32, "none": 0}  # what a host checks, and its digest's length in hex


def main() -> int:
    started = time.monotonic()
    if sys.version_info < (3, 9):
        print(f"python3 {sys.version.split()[0]} is too old to pull from S3: 3.9 or newer is needed", file=sys.stderr)
        return 1
    try:
        result = pull(json.loads(sys.stdin.buffer.read()), Guard(started))
    except PullError as error:
        print(str(error), file=sys.stderr)
        return 1
    except OSError as error:  # the host's disk: full, read-only, a name too long
        print(f"the pull stopped: {error.strerror or error} ({error.filename or 'no file named'})", file=sys.stderr)
        return 1
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result))
    return 0


class Guard:
    """What ends a pull early: its deadline, a failed object, or the deploy that started it gone (its ssh session
    ended, so this process has another parent): a pull cut off never goes on to install an old listing later."""

    def __init__(self, started: float):
        self.started, self.deadline, self.deadline_seconds = started, float("inf"), 0.0
        self.parent = os.getppid()
        self.stop = threading.Event()

    def check(self, what: str) -> None:
        if self.stop.is_set():
            raise PullError("stopped: another object failed")
        if time.monotonic() > self.deadline:
            raise PullError(f"{what}: the pull's deadline ({self.deadline_seconds:g} s) passed")
        if os.getppid() != self.parent:
            raise PullError("the deploy that started this pull is gone")


def pull(job: dict, guard: Guard) -> dict:
    guard.deadline_seconds = float(job["deadline"])
    guard.deadline = guard.started + guard.deadline_seconds
    destination = safe_relative(job["destination"])
    objects = [dict(zip(("path", "key", "size", "etag", "algorithm", "checksum", "mode"), entry))
               for entry in job["objects"]]
    for entry in objects:
        check_entry(entry)
    with PullLock(job["lock"], destination, guard):
        refuse_linked(destination)
        records = read_records(job["records"])
        wanted = [entry for entry in objects if not held(destination, entry, records, guard)]
        staging = os.path.join(destination, STAGING)
        shutil.rmtree(staging, ignore_errors=True)  # ours by its name: left by a pull cut off
        if wanted:
            os.makedirs(staging, mode=0o700)
            try:
                fetched = fetch_all(S3Client(job["bucket"], job["region"]), wanted, staging, guard)
                guard.check(f"installing into ~/{destination}")
                install_all(destination, wanted, fetched)
            finally:  # a failed pull keeps none of what it fetched
                shutil.rmtree(staging, ignore_errors=True)
        removed = remove_unlisted(destination, {entry["path"] for entry in objects})
        write_json(job["records"], {entry["path"]: record(destination, entry) for entry in objects})
        write_json(job["state"], {"job": job["job"], "tree": tree_digest(destination, job["summary"], guard)})
    return {"fetched": len(wanted), "bytes": sum(entry["size"] for entry in wanted), "removed": removed}


class PullLock:
    """One pull of a resource at a time on a host (flock, released when this process ends, however it ends)."""

    def __init__(self, path: str, destination: str, guard: Guard):
        self.path, self.destination, self.guard = path, destination, guard

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.file = open(self.path, "a")
        waited_until = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > waited_until:
                    self.file.close()
                    raise PullError(f"another pull into ~/{self.destination} is under way on this host") from None
                self.guard.check(f"waiting for the pull into ~/{self.destination} under way")
                time.sleep(0.2)

    def __exit__(self, *exception) -> None:
        self.file.close()  # the lock goes with it


def refuse_linked(destination: str) -> None:
    """The resource's directory is the pull's own: a symlink there would take its writes and removals elsewhere."""
    if os.path.islink(destination):
        raise PullError(f"~/{destination} is a symlink (to {os.readlink(destination)!r}): an S3 resource goes only "
                        "into a directory of its own; remove the link")
    if os.path.lexists(destination) and not os.path.isdir(destination):
        raise PullError(f"~/{destination} is not a directory: move it away")
    os.makedirs(destination, exist_ok=True)


def check_entry(entry: dict) -> None:
    safe_relative(entry["path"])
    if entry["path"].split("/")[0] == STAGING:
        raise PullError(f"refused the path {entry['path']!r}: {STAGING} is the pull's own")
    length = ALGORITHMS.get(entry["algorithm"])
    if length is None or len(entry["checksum"]) != length:
        raise PullError(f"refused {entry['path']!r}: its checksum is not a sha256, an md5 or none")


def safe_relative(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise PullError(f"refused the path {path!r}: not a plain path inside the resource")
    return path


def read_records(path: str) -> dict:
    """What the last pull checked: path -> `record`; nothing if unreadable."""
    try:
        with open(path, "rb") as file:
            records = json.loads(file.read(256 << 20))
    except (OSError, ValueError, RecursionError):
        return {}
    return records if isinstance(records, dict) else {}


def record(destination: str, entry: dict) -> list:
    """The file as this pull left it, checked: a file rewritten since has another ctime, which no one can set back."""
    status = os.lstat(os.path.join(destination, entry["path"]))
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, entry["algorithm"],
            entry["checksum"], status.st_mode & 0o777]


def plain_file(destination: str, path: str) -> bool:
    """PATH is a regular file reached through directories only: no symlink on the way."""
    current = destination
    for part in path.split("/"):
        current = os.path.join(current, part)
        if os.path.islink(current):
            return False
    return os.path.isfile(current)


def held(destination: str, entry: dict, records: dict, guard: Guard) -> bool:
    """The file is there as the last pull left it after checking these very bytes (size and mtime as rsync's quick
    check), or, unknown to the records, it hashes to the listed checksum; with the listed mode either way."""
    path = os.path.join(destination, entry["path"])
    try:
        if not plain_file(destination, entry["path"]) or os.path.getsize(path) != entry["size"] \
                or os.lstat(path).st_mode & 0o777 != entry["mode"]:
            return False
        if records.get(entry["path"]) == record(destination, entry):
            return True
        if entry["algorithm"] == "none":
            return False
        digest = hashlib.new(entry["algorithm"], usedforsecurity=False)
        with open(path, "rb") as file:
            while chunk := file.read(CHUNK):
                guard.check(f"checking ~/{path}")
                digest.update(chunk)
        return digest.hexdigest() == entry["checksum"]
    except OSError:
        return False


def fetch_all(client, wanted: list, staging: str, guard: Guard) -> dict[str, str]:
    """Every wanted object into STAGING once (files with the same content share their key), checked: {key: its
    file}. The first failure stops the rest and is the host's cause."""
    keys = {entry["key"]: entry for entry in wanted}
    places = [(entry, os.path.join(staging, str(index))) for index, entry in enumerate(keys.values())]
    with concurrent.futures.ThreadPoolExecutor(min(WORKERS, len(places))) as pool:
        futures = [pool.submit(fetch_checked, client, entry, temporary, guard) for entry, temporary in places]
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [future for future in done if future.exception() is not None]
        if failed:
            guard.stop.set()
            for future in futures:
                future.cancel()
            raise failed[0].exception()
    return {entry["key"]: temporary for entry, temporary in places}


def fetch_checked(client, entry: dict, temporary: str, guard: Guard) -> None:
    url = f"s3://{client.bucket}/{entry['key']}"
    for attempt in range(ATTEMPTS):
        guard.check(url)
        try:
            digest, size = get_object(client, entry, temporary, guard)
            break
        except Retry as retry:
            if attempt == ATTEMPTS - 1:
                raise PullError(f"{url}: {retry} ({ATTEMPTS} tries)") from None
            time.sleep(min(8.0, 0.25 * 2 ** attempt))
    if size != entry["size"]:
        raise PullError(f"{url}: {size} bytes arrived where the listing said {entry['size']}; nothing of it kept")
    if entry["algorithm"] != "none" and digest != entry["checksum"]:
        raise PullError(f"{url}: its {entry['algorithm']} is {digest}, not the listed {entry['checksum']}: the "
                        "bytes that arrived are not the object listed; nothing of it kept")


def get_object(client, entry: dict, temporary: str, guard: Guard) -> tuple[str, int]:
    """The object's bytes into TEMPORARY, hashed as they arrive: (hex digest, size). Never more than the listed
    size plus one byte is read: a longer answer fails its size check."""
    url = f"s3://{client.bucket}/{entry['key']}"
    response = client.get(entry["key"], {"If-Match": entry["etag"]})
    try:
        if response.status != 200:
            raise_for_status(response, url, client.role)
        algorithm = entry["algorithm"] if entry["algorithm"] != "none" else "sha256"
        digest = hashlib.new(algorithm, usedforsecurity=False)
        size = 0
        with open(temporary, "wb") as file:
            while size <= entry["size"]:
                guard.check(url)
                chunk = client.read(response, min(CHUNK, entry["size"] + 1 - size))
                if not chunk:
                    break
                digest.update(chunk)
                file.write(chunk)
                size += len(chunk)
        return digest.hexdigest(), size
    except BaseException:
        client.drop()
        raise


def install_all(destination: str, wanted: list, fetched: dict[str, str]) -> None:
    """Each wanted file into place: renamed from its key's fetched file, or copied when another file takes it too."""
    users = {}
    for entry in wanted:
        users[entry["key"]] = users.get(entry["key"], 0) + 1
    for entry in wanted:
        users[entry["key"]] -= 1
        source = fetched[entry["key"]]
        if users[entry["key"]]:
            shutil.copyfile(source, f"{source}.copy")
            source = f"{source}.copy"
        install(destination, entry, source)


def install(destination: str, entry: dict, temporary: str) -> None:
    """Rename the checked file over its place; whatever stands in the way inside the resource (a file where a
    directory must be, a symlink, a directory where the file goes) is not in the listing and goes."""
    parts = entry["path"].split("/")
    current = destination
    for part in parts[:-1]:
        current = os.path.join(current, part)
        if os.path.islink(current) or (os.path.lexists(current) and not os.path.isdir(current)):
            os.remove(current)
        os.makedirs(current, exist_ok=True)
    target = os.path.join(destination, entry["path"])
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    os.chmod(temporary, entry["mode"] & 0o755)
    os.replace(temporary, target)


def remove_unlisted(destination: str, listed: set[str]) -> int:
    """What is in the resource's directory and not in the listing goes (rsync's --delete, inside it only: os.walk
    follows no symlink, and a symlink is removed as itself)."""
    parents = {"/".join(path.split("/")[:depth]) for path in listed for depth in range(1, path.count("/") + 1)}
    removed = 0
    for root, directories, names in os.walk(destination, topdown=False):
        relative = os.path.relpath(root, destination).replace(os.sep, "/")
        for name in [*names, *(name for name in directories if os.path.islink(os.path.join(root, name)))]:
            path = name if relative == "." else f"{relative}/{name}"
            if path not in listed:
                os.remove(os.path.join(root, name))
                removed += 1
        if relative != "." and relative not in parents and not os.listdir(root):
            os.rmdir(root)
    return removed


def tree_digest(destination: str, summary_command: str, guard: Guard) -> str:
    """The directory's digest as the deploy's state read computes it, so an untouched copy is seen as such there."""
    left = max(60.0, guard.deadline - time.monotonic())
    try:
        result = subprocess.run(["sh", "-c", summary_command], cwd=destination, capture_output=True, timeout=left)
    except subprocess.TimeoutExpired:
        raise PullError(f"listing ~/{destination} after the pull took over {left:.0f} s") from None
    return result.stdout.split(b"\n", 1)[0].decode(errors="replace")


def write_json(path: str, document: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w") as file:
        json.dump(document, file, separators=(",", ":"))
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
