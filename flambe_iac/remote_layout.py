"""Where everything lives on a host, relative to the SSH user's home; and the manifest's content.

Nothing here talks to a host. The cluster key's files are edited by `cluster_key`, the ssh config block is
`ssh.policy`'s.
"""

from __future__ import annotations

import json

from flambe_iac.names import refuse_unsafe_fields

CLUSTER_PRIVATE_KEY = "ray_bootstrap_key.pem"
CLUSTER_PUBLIC_KEY = "ray_bootstrap_key.pub"
AUTHORIZED_KEYS = ".ssh/authorized_keys"
MEMBERS_KNOWN_HOSTS = ".ssh/flambe_known_hosts"
SSH_CONFIG = ".ssh/config"
SECRETS = "secret.ini"
RESOURCES_DIR = "resources"
EXTENSIONS_DIR = "extensions"
STAGING_DIR = ".flambe/staging"  # 0700; each run stages its uploads in a directory of its own below it
MANIFEST = ".flambe/cluster.json"
RETIRED_KEYS = ".flambe/retired_cluster_keys"  # fingerprints of cluster keys never to authorize again
DEPLOY_LOCK = ".flambe/deploy.lock"  # on the orchestrator: held (flock) by the deploy under way, and says whose
RUNNER_LIBRARY = ".flambe/lib"  # this flambe_iac, for the runner on the orchestrator and the autostop agent
# How the pushed flambe_iac runs, from the home: no __pycache__ written into it, so its copy stays as sent.
LIBRARY_ENVIRONMENT = f'PYTHONPATH="$HOME/{RUNNER_LIBRARY}" PYTHONDONTWRITEBYTECODE=1' 
RUN_PLAN = ".flambe/run.json"
RUN_LOG = ".flambe/run.log"
RUN_PID = ".flambe/run.pid"
RUN_EXIT = ".flambe/run.exit"  # the runnable's exit code, once it has ended
S3_PULLER = ".flambe/tools/s3_pull.py"  # agent/s3_pull.py, run by the host's python3, and agent/s3_client.py beside it
S3_CLIENT = ".flambe/tools/s3_client.py"
S3_RECORDS = ".flambe/s3"  # NAME/: an S3 resource's records (`s3_records`)


def s3_records(name: str) -> tuple[str, str, str]:
    """Where the pulls of the S3 resource NAME keep their records: what the last one pulled and the tree's digest
    after it; each file's size, mtime, checksum and mode once checked; and the lock a pull holds."""
    return f"{S3_RECORDS}/{name}/state.json", f"{S3_RECORDS}/{name}/files.json", f"{S3_RECORDS}/{name}/lock"


def run_staging_dir(run_id: str) -> str:
    """This run's own staging directory: two deploys at once never share an upload name."""
    return f"{STAGING_DIR}/{run_id}"


def members_known_hosts(host_keys: dict[str, list[str]]) -> bytes:
    """known_hosts lines for every member, by private address: {address: ["ssh-ed25519 AAAA...", ...]}."""
    for address, keys in host_keys.items():
        refuse_unsafe_fields("members' known hosts", address, *(field for key in keys for field in key.split()))
    return "".join(f"{address} {key}\n" for address, keys in host_keys.items() for key in keys).encode()


def recorded_resources(data: bytes) -> dict[str, dict] | None:
    """{resource: {path: sha256}} that a host's manifest records; None if DATA (a host's bytes) is not one."""
    try:
        manifest = json.loads(data.decode(errors="replace") or "null")
    except (ValueError, RecursionError):  # not JSON, too deep, or a number too long to read
        return None
    resources = manifest.get("resources") if isinstance(manifest, dict) else None
    if not isinstance(resources, dict) or not all(isinstance(files, dict) for files in resources.values()):
        return None
    return resources


def manifest(cluster_name: str, role: str, host_id: str, members: list[dict], key_fingerprint: str,
             resources: dict[str, dict[str, str]], version: str, extensions: dict[str, dict]) -> bytes:
    """~/.flambe/cluster.json: what this host is part of. It never holds a secret."""
    refuse_unsafe_fields("the manifest", cluster_name, role, host_id, key_fingerprint)
    document = {
        "cluster_name": cluster_name,
        "role": role,
        "host_id": host_id,
        "members": members,
        "cluster_key_fingerprint": key_fingerprint,
        "resources": resources,
        "extensions": extensions,
        "flambe_iac_version": version,
    }
    # Compact: json's C encoder, ten times faster than its indenting one on the checksums of a million files.
    return (json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n").encode()
