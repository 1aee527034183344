"""Host keys read from EC2 console output, the way AWS documents to verify a new instance's SSH key.

cloud-init prints the host keys to the console at first boot, between
    -----BEGIN SSH HOST KEY KEYS-----  and  -----END SSH HOST KEY KEYS-----
(lines may carry a syslog, kernel-time or `ec2:` prefix). If it also printed the keys' fingerprints, each key must
match one of them, or the output is not trusted.
"""

from __future__ import annotations

import binascii
import re
import time
from concurrent.futures import ThreadPoolExecutor

from flambe_iac.ssh.user_key import public_key_fingerprint

KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
KEYS_END = "-----END SSH HOST KEY KEYS-----"
FINGERPRINTS_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
FINGERPRINTS_END = "-----END SSH HOST KEY FINGERPRINTS-----"
KEY = re.compile(r"\b(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa|ssh-dss)\s+(AAAA[A-Za-z0-9+/]+={0,2})")
FINGERPRINT = re.compile(r"\b(SHA256:[A-Za-z0-9+/]{43})\b")
POLL_SECONDS = 10.0


def parse_console_host_keys(output: str) -> list[str]:
    """The host keys ("type base64") of the last boot that printed them; [] if none can be trusted."""
    keys_block = _last_block(output, KEYS_BEGIN, KEYS_END)
    if keys_block is None:
        return []
    keys = list(dict.fromkeys(f"{match[1]} {match[2]}" for match in KEY.finditer(keys_block)))
    fingerprints_block = _last_block(output, FINGERPRINTS_BEGIN, FINGERPRINTS_END)
    if fingerprints_block:
        printed = set(FINGERPRINT.findall(fingerprints_block))
        if printed and not all(_fingerprint(key) in printed for key in keys):
            return []
    return keys


def _last_block(output: str, begin: str, end: str) -> str | None:
    start = output.rfind(begin)
    if start == -1:
        return None
    stop = output.find(end, start)
    return output[start + len(begin):stop] if stop != -1 else None


def _fingerprint(key: str) -> str:
    try:
        return public_key_fingerprint(key)
    except (binascii.Error, ValueError):
        return ""  # garbled: matches no printed fingerprint


def fetch_console_host_keys(ec2, instance_ids: list[str], timeout: float,
                            poll_seconds: float = POLL_SECONDS) -> dict[str, list[str]]:
    """Poll every instance's console output at once until each shows its host keys or TIMEOUT passes.

    Returns the keys found, by instance id; instances still without keys are left out.
    """
    found: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(instance_ids)))) as pool:
        while True:
            pending = [instance_id for instance_id in instance_ids if instance_id not in found]
            for instance_id, keys in zip(pending, pool.map(lambda i: parse_console_host_keys(console_output(ec2, i)),
                                                          pending)):
                if keys:
                    found[instance_id] = keys
            if len(found) == len(instance_ids) or time.monotonic() + poll_seconds > deadline:
                return found
            time.sleep(poll_seconds)


def console_output(ec2, instance_id: str) -> str:
    """The newest console output (Latest needs a Nitro instance; older types give the buffered output)."""
    from botocore.exceptions import ClientError

    try:
        return ec2.get_console_output(InstanceId=instance_id, Latest=True).get("Output") or ""
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "UnsupportedOperation":
            raise
    return ec2.get_console_output(InstanceId=instance_id).get("Output") or ""


def console_keys_by_address(region: str, members: list[tuple[str, str]], timeout: float) -> dict[str, list[str]]:
    """{address: keys} for MEMBERS [(instance id, address)], read with boto3's default credentials."""
    from flambe_iac.aws.client import aws_errors, ec2_client

    ec2 = ec2_client(region)
    with aws_errors("reading host keys from EC2 console output (ec2:GetConsoleOutput)",
                    "or pass --known-hosts FILE, or --trust-on-first-use"):
        found = fetch_console_host_keys(ec2, [instance_id for instance_id, _ in members], timeout)
    return {address: found[instance_id] for instance_id, address in members if instance_id in found}
