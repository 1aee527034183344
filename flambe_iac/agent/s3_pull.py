"""On a host: make ~/DESTINATION hold exactly the objects this machine listed under an S3 prefix, each checked.

Sent to every host as this one file, run by its python3 (3.9 or newer, standard library only: why, README's
"Resources from S3"). The job comes as JSON on stdin: names, sizes, checksums. S3 is read with the instance role
alone (IMDSv2), never with credentials from the environment, a file or an argument. Each object is fetched once
with If-Match (the version listed, or a failure), hashed as it streams, and renamed into place only once every
object of the prefix has passed its check.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse

METADATA = "169.254.169.254"
CHUNK = 1 << 20
ANSWER_LIMIT = 64 << 10  # bytes read of a metadata answer or an S3 error
ATTEMPTS = 5  # for 500, 503 (SlowDown), RequestTimeout and dropped connections
WORKERS = 8
SOCKET_TIMEOUT = 60.0
LOCK_WAIT = 30.0  # an earlier pull of the same resource, cut off with its deploy, stops within this


class PullError(Exception):
    """A cause in words: the host fails with it."""


class Retry(Exception):  # a failure worth another try: S3 busy, or the connection dropped
    pass


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
        safe_relative(entry["path"])
    with PullLock(job["lock"], destination, guard):
        refuse_linked(destination)
        records = read_records(job["records"])
        wanted = [entry for entry in objects if not held(destination, entry, records, guard)]
        staging = os.path.join(os.path.dirname(destination), f".{os.path.basename(destination)}.s3-partial")
        shutil.rmtree(staging, ignore_errors=True)  # ours by its name: left by a pull cut off
        if wanted:
            os.makedirs(staging, mode=0o700)
            try:
                for entry, temporary in fetch_all(S3Client(job["bucket"], job["region"]), wanted, staging, guard):
                    install(destination, entry, temporary)
            finally:  # a failed pull keeps none of what it fetched
                shutil.rmtree(staging, ignore_errors=True)
        removed = remove_unlisted(destination, {entry["path"] for entry in objects})
        write_json(job["records"], {entry["path"]: record(destination, entry) for entry in objects})
        write_json(job["state"], {"job": job["job"], "tree": tree_digest(destination, job["summary"])})
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


def safe_relative(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise PullError(f"refused the path {path!r}: not a plain path inside the resource")
    return path


def read_records(path: str) -> dict:
    """What the last pull checked: path -> [size, mtime_ns, algorithm, checksum, mode]; nothing if unreadable."""
    try:
        with open(path, "rb") as file:
            records = json.loads(file.read(256 << 20))
    except (OSError, ValueError, RecursionError):
        return {}
    return records if isinstance(records, dict) else {}


def record(destination: str, entry: dict) -> list:
    status = os.lstat(os.path.join(destination, entry["path"]))
    return [status.st_size, status.st_mtime_ns, entry["algorithm"], entry["checksum"], status.st_mode & 0o777]


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


def fetch_all(client, wanted: list, staging: str, guard: Guard) -> list:
    """Every wanted object into STAGING, checked; the first failure stops the rest and is the host's cause."""
    places = [(entry, os.path.join(staging, str(index))) for index, entry in enumerate(wanted)]
    with concurrent.futures.ThreadPoolExecutor(min(WORKERS, len(wanted))) as pool:
        futures = [pool.submit(fetch_checked, client, entry, temporary, guard) for entry, temporary in places]
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [future for future in done if future.exception() is not None]
        if failed:
            guard.stop.set()
            for future in futures:
                future.cancel()
            raise failed[0].exception()
    return places


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


def raise_for_status(response, url: str, role: str) -> None:
    body = response.read(ANSWER_LIMIT).decode(errors="replace")
    code = between(body, "<Code>", "</Code>") or str(response.status)
    if response.status in (500, 502, 503, 504) or code == "RequestTimeout":
        raise Retry(f"S3 answered {response.status} {code}")
    if response.status == 412:
        raise PullError(f"{url} changed after this machine listed it (its ETag is no longer the one listed): "
                        "deploy again to take the new version; nothing of it kept")
    if code == "AccessDenied":
        raise PullError(f"{url}: the instance role {role} is refused s3:GetObject (AccessDenied): give the instances "
                        "an iamInstanceProfile whose role may read the prefix (flambe-deploy check --resource ...)")
    if code == "NoSuchKey":
        raise PullError(f"{url} was deleted after this machine listed it: deploy again")
    if code == "RequestTimeTooSkewed":
        raise PullError(f"{url}: S3 refused the request because this host's clock is off (RequestTimeTooSkewed)")
    raise PullError(f"{url}: S3 answered {response.status} {code}")


def between(text: str, start: str, end: str) -> str:
    return "".join(ch for ch in text.partition(start)[2].partition(end)[0] if ch.isprintable())[:200]


class S3Client:
    """GETs of one bucket's objects, signed (SigV4) with the instance role's credentials from IMDSv2 and fetched
    again before they lapse; each worker thread keeps its own connection open from one object to the next."""

    def __init__(self, bucket: str, region: str):
        self.bucket, self.region = bucket, region
        self.lock = threading.Lock()
        self.local = threading.local()
        self.credentials: dict = {}
        self.role = ""
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parts = urllib.parse.urlsplit(endpoint)
            self.secure, self.netloc, self.prefix = parts.scheme == "https", parts.netloc, f"/{bucket}"
        elif "." in bucket:  # a dotted name breaks the wildcard certificate of virtual-hosted addresses
            self.secure, self.netloc, self.prefix = True, f"s3.{region}.amazonaws.com", f"/{bucket}"
        else:
            self.secure, self.netloc, self.prefix = True, f"{bucket}.s3.{region}.amazonaws.com", ""
        self.refresh()

    def get(self, key: str, extra: dict):
        path = f"{self.prefix}/{urllib.parse.quote(key, safe='/~')}"
        connection = getattr(self.local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self.secure else http.client.HTTPConnection
            connection = self.local.connection = kind(self.netloc, timeout=SOCKET_TIMEOUT)
        headers = {**self.headers("GET", path), **extra}
        try:
            connection.request("GET", path, headers=headers)  # its Host header is ours: the one signed
            return connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            self.drop()
            raise Retry(f"the connection failed: {error}") from None

    @staticmethod
    def read(response, size: int) -> bytes:
        try:
            return response.read(size)
        except (OSError, http.client.HTTPException) as error:
            raise Retry(f"the connection failed: {error}") from None

    def drop(self) -> None:
        if getattr(self.local, "connection", None) is not None:
            self.local.connection.close()
            self.local.connection = None

    def headers(self, method: str, path: str) -> dict:
        with self.lock:
            if time.time() > self.credentials["expires"] - 300:
                self.refresh()
            credentials = dict(self.credentials)
        now = datetime.datetime.now(datetime.timezone.utc)
        return sigv4_headers(method, self.netloc, path, self.region, credentials, now)

    def refresh(self) -> None:
        token = metadata("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
        headers = {"X-aws-ec2-metadata-token": token}
        roles = metadata("GET", "/latest/meta-data/iam/security-credentials/", headers, missing_ok=True)
        role = roles.strip().splitlines()[0].strip() if roles.strip() else ""
        if not role or "/" in role:
            raise PullError("this host has no instance role (the metadata service lists none): give the instances an "
                            "iamInstanceProfile whose role may read the prefix (s3:GetObject)")
        answer = metadata("GET", f"/latest/meta-data/iam/security-credentials/{urllib.parse.quote(role)}", headers)
        try:
            document = json.loads(answer)
            self.credentials = {"id": document["AccessKeyId"], "secret": document["SecretAccessKey"],
                                "token": document.get("Token", ""),
                                "expires": parse_expiration(document.get("Expiration"))}
        except (ValueError, KeyError, TypeError):
            raise PullError(f"the metadata service's credentials for the role {role} are not readable") from None
        self.role = role


def parse_expiration(text) -> float:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()
    except (TypeError, ValueError):  # none, or not EC2's format: fetch them again in five minutes
        return time.time() + 300


def metadata(method: str, path: str, headers: dict, missing_ok: bool = False) -> str:
    address = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://{METADATA}")
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(address).netloc, timeout=5)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read(ANSWER_LIMIT).decode(errors="replace")
    except (OSError, http.client.HTTPException) as error:
        raise PullError(f"the instance metadata service did not answer ({error}): S3 is read with the instance "
                        "role, which it hands out") from None
    finally:
        connection.close()
    if response.status == 404 and missing_ok:
        return ""
    if response.status != 200:
        raise PullError(f"the instance metadata service answered {response.status} to {path}")
    return body


def sigv4_headers(method: str, host: str, path: str, region: str, credentials: dict,
                  now: datetime.datetime) -> dict:
    """AWS Signature Version 4 for an S3 request without a body (the tests compare it with botocore's signer).
    HOST is sent as signed: with its port, if it has one."""
    stamp_time, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    headers = {"host": host, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": stamp_time}
    if credentials.get("token"):
        headers["x-amz-security-token"] = credentials["token"]
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, path, "", *(f"{name}:{headers[name].strip()}" for name in sorted(headers)), "",
                           signed, "UNSIGNED-PAYLOAD"])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp_time, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + credentials["secret"]).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={credentials['id']}/{scope}, SignedHeaders={signed}, "
                                f"Signature={signature}")
    return headers


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


def tree_digest(destination: str, summary_command: str) -> str:
    """The directory's digest as the deploy's state read computes it, so an untouched copy is seen as such there."""
    try:
        result = subprocess.run(["sh", "-c", summary_command], cwd=destination, capture_output=True, timeout=3600)
    except subprocess.TimeoutExpired:
        raise PullError(f"listing ~/{destination} after the pull took over an hour") from None
    return result.stdout.split(b"\n", 1)[0].decode(errors="replace")


def write_json(path: str, document: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w") as file:
        json.dump(document, file, separators=(",", ":"))
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
