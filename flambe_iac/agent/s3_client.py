"""On a host: the S3 side of a pull (s3_pull.py runs it): GETs of one bucket's objects, signed (SigV4) with the
instance role's credentials from IMDSv2, and S3's answers turned into a retry or a cause in words. Standard library
only; sent beside s3_pull.py."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import json
import os
import threading
import time
import urllib.parse

METADATA = "169.254.169.254"
ANSWER_LIMIT = 64 << 10  # bytes read of a metadata answer or an S3 error
SOCKET_TIMEOUT = 60.0


class PullError(Exception):
    """A cause in words: the host fails with it."""


class Retry(Exception):  # a failure worth another try: S3 busy, or the connection dropped
    pass


def raise_for_status(response, url: str, role: str) -> None:
    """What S3's answer other than 200 means: a Retry, or a PullError in words."""
    try:
        body = response.read(ANSWER_LIMIT).decode(errors="replace")
    except (OSError, http.client.HTTPException) as error:
        raise Retry(f"S3 answered {response.status}, then the connection failed: {error}") from None
    code = between(body, "<Code>", "</Code>") or str(response.status)
    if response.status in (500, 502, 503, 504) or code == "RequestTimeout":
        raise Retry(f"S3 answered {response.status} {code}")
    if response.status == 412:
        raise PullError(f"{url} changed after this machine listed it (its ETag is no longer the one listed): "
                        "deploy again to take the new version; nothing of it kept")
    if code == "AccessDenied":
        raise PullError(f"{url}: AccessDenied for the instance role {role} ({between(body, '<Message>', '</Message>')})"
                        ": its policy may not allow s3:GetObject there (flambe-deploy check --resource ... says), or a "
                        "bucket or KMS key policy refuses it, or the object is gone (without s3:ListBucket, S3 says "
                        "AccessDenied for a missing key)")
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
