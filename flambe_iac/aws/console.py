"""EC2 console output: polled for every instance at once until each shows its host keys."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from flambe_iac.aws.client import aws_errors, ec2_client
from flambe_iac.ssh.console_pins import parse_console_host_keys

POLL_SECONDS = 10.0


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
    from botocore.exceptions import ClientError  # boto3 stays off the CLI's start-up path

    try:
        return ec2.get_console_output(InstanceId=instance_id, Latest=True).get("Output") or ""
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "UnsupportedOperation":
            raise
    return ec2.get_console_output(InstanceId=instance_id).get("Output") or ""


def console_keys_by_address(region: str, members: list[tuple[str, str]], timeout: float) -> dict[str, list[str]]:
    """{address: keys} for MEMBERS [(instance id, address)], read with boto3's default credentials."""
    ec2 = ec2_client(region)
    with aws_errors("reading host keys from EC2 console output (ec2:GetConsoleOutput)",
                    "or pass --known-hosts FILE, or --trust-on-first-use"):
        found = fetch_console_host_keys(ec2, [instance_id for instance_id, _ in members], timeout)
    return {address: found[instance_id] for instance_id, address in members if instance_id in found}
