"""S3 resources: every host pulls each listed prefix into ~/resources/NAME/ with its own instance role, checking
each object against the checksum this machine listed (agent/s3_pull.py and agent/s3_client.py, sent to
~/.flambe/tools/, run by python3)."""

from __future__ import annotations

import json
from pathlib import Path

from pyinfra.api import operation

import flambe_iac.agent
from flambe_iac.deploys.operations import host_function, ran, staged_files
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest
from flambe_iac.remote_layout import S3_CLIENT, S3_PULLER, s3_records
from flambe_iac.inputs.secrets_file import HiddenBytes
from flambe_iac.inputs.tree_listing import REMOTE_TREE_SUMMARY

PULL_DEADLINE = 6 * 3600.0
RESULT_LIMIT = 4096  # bytes of the puller's answer: one line of JSON


# The host's python3 checked before the puller runs (it would not even compile on 3.7); -E -s: no PYTHON*
# variable or user site-packages reaches the puller's imports.
PULL_COMMAND = (f"cd && python3 -E -s -c 'import sys; sys.exit(sys.version_info < (3, 9))' || "
                f"{{ echo \"$(python3 -V 2>&1) is too old to pull from S3: 3.9 or newer is needed\" >&2; exit 1; }}; "
                f"exec python3 -E -s {S3_PULLER}")


def puller_files() -> list[tuple[str, HiddenBytes, str]]:
    """The puller and its S3 side, as the hosts get them (each sent again only when it changed)."""
    here = Path(flambe_iac.agent.__file__).parent
    return [(S3_PULLER, HiddenBytes((here / "s3_pull.py").read_bytes()), "644"),
            (S3_CLIENT, HiddenBytes((here / "s3_client.py").read_bytes()), "644")]


def reads(context) -> SnapshotRequest:
    listings = context.plan.s3_listings.values()
    return SnapshotRequest(files=(S3_PULLER, S3_CLIENT), contents=tuple(s3_records(listing.resource.name)[0]
                                                               for listing in listings),
                           trees=tuple(listing.resource.remote_directory for listing in listings),
                           tools=("python3", "find", "sort", "sha256sum", "base64"))


def pulled_already(listing, snapshot: HostSnapshot) -> bool:
    """The host's last pull recorded this very listing, and its copy is as that pull left it."""
    tree = snapshot.trees.get(listing.resource.remote_directory)
    try:
        state = json.loads(snapshot.contents.get(s3_records(listing.resource.name)[0], b"") or b"null")
    except (ValueError, RecursionError):  # the host's bytes: garbage means "pull again"
        return False
    return (isinstance(state, dict) and tree is not None and not tree.links
            and state.get("job") == listing.digest() and state.get("tree") == tree.digest)


def pull_s3_resources(context, member, snapshot: HostSnapshot) -> list:
    for listing in context.plan.s3_listings.values():
        if listing.unverified:
            context.notes.append(f"{listing.resource.url}: {len(listing.unverified)} objects pulled unchecked "
                                 f"(--allow-unverified), e.g. {listing.unverified[0]!r}")
    stale = [listing for listing in context.plan.s3_listings.values() if not pulled_already(listing, snapshot)]
    if not stale:
        return []
    puller = staged_files(name="the S3 puller", files=puller_files(),
                          snapshot=snapshot, staging=context.staging, causes=context.causes)
    return [puller, *(pulled_prefix(name=f"pull {listing.resource.url}", job=pull_job(listing),
                                    url=listing.resource.url, causes=context.causes, details=context.details)
                      for listing in stale)]


def pull_job(listing) -> bytes:
    """What the puller reads on its stdin: names, sizes, ETags and checksums; no credential of any kind."""
    resource = listing.resource
    state, records, lock = s3_records(resource.name)
    return json.dumps({
        "bucket": resource.bucket, "region": listing.region, "destination": resource.remote_directory,
        "state": state, "records": records, "lock": lock,
        "job": listing.digest(), "summary": REMOTE_TREE_SUMMARY, "deadline": PULL_DEADLINE,
        "objects": listing.job_objects(),
    }).encode()


@operation(is_idempotent=False)
def pulled_prefix(job: bytes, url: str, causes: dict, details: dict):
    yield host_function(_pull_prefix, job, url, causes, details, causes=causes)


def _pull_prefix(state, host, job: bytes, url: str, causes: dict, details: dict) -> bool:
    result = ran(host, PULL_COMMAND, causes, f"pulling {url} did not finish",
                 f"pulling {url} failed", stdin=job, timeout=PULL_DEADLINE + 60, limit=RESULT_LIMIT)
    if result is None:
        return False
    said = pull_result(result.stdout)
    if said is None:
        causes[host.name] = f"pulling {url}: the puller's answer is not one it prints"
        return False
    details[host.name] = "; ".join(filter(None, [details.get(host.name), f"{url}: {said}"]))
    return True


def pull_result(output: bytes) -> str | None:
    """The puller's one line of JSON, in words; None for anything else (the host's bytes)."""
    try:
        answer = json.loads(output.decode(errors="replace").strip().splitlines()[-1])
        fetched, size, removed, seconds = (answer[name] for name in ("fetched", "bytes", "removed", "seconds"))
    except (ValueError, IndexError, KeyError, TypeError, RecursionError):
        return None
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
               for value in (fetched, size, removed, seconds)):
        return None
    return f"{fetched} objects pulled ({size / 1e6:.1f} MB in {seconds:.2f} s), {removed} removed"
