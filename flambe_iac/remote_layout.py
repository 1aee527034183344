"""Where everything lives on a host (paths relative to the SSH user's home), and the pure text transforms
that keep the managed files correct. Nothing here talks to a host."""

from __future__ import annotations

import json

CLUSTER_PRIVATE_KEY = "ray_bootstrap_key.pem"
CLUSTER_PUBLIC_KEY = "ray_bootstrap_key.pub"
SSH_DIR = ".ssh"
AUTHORIZED_KEYS = ".ssh/authorized_keys"
MEMBERS_KNOWN_HOSTS = ".ssh/flambe_known_hosts"
SSH_CONFIG = ".ssh/config"
SECRETS = "secret.ini"
RESOURCES_DIR = "resources"
STATE_DIR = ".flambe"
STAGING_DIR = ".flambe/staging"  # 0700: uploads land here, then are renamed into place
MANIFEST = ".flambe/cluster.json"
EXTENSIONS_DIR = "extensions"
RUNNER_LIBRARY = ".flambe/lib"  # this flambe_iac, for the runner on the orchestrator
RUN_PLAN = ".flambe/run.json"
RUN_LOG = ".flambe/run.log"
RUN_PID = ".flambe/run.pid"


def cluster_key_comment(cluster_name: str) -> str:
    """The comment on the cluster's public key: it names the cluster, and marks lines we may remove."""
    return f"flambe-cluster:{cluster_name}"


def updated_authorized_keys(current: bytes, public_line: str, cluster_name: str,
                            retired_keys: list[str] = ()) -> bytes:
    """authorized_keys with exactly one key of this cluster, the given one; every other line byte-identical.

    Lines of this cluster (by comment) with another key, and lines holding a retired cluster key
    ("type base64"), are old cluster keys and are removed.
    """
    comment = cluster_key_comment(cluster_name).encode()
    retired = {tuple(key.split()[:2]) for key in retired_keys}
    wanted = public_line.strip().encode()
    kept, has_wanted = [], False
    for line in current.splitlines(keepends=True):
        fields = line.strip().split()
        key_fields = tuple(field.decode(errors="replace") for field in fields[:2])
        if fields[-1:] == [comment] or (key_fields in retired and line.strip() != wanted):
            if line.strip() == wanted and not has_wanted:
                kept.append(line)
                has_wanted = True
            continue
        kept.append(line)
    if not has_wanted:
        if kept and not kept[-1].endswith(b"\n"):
            kept[-1] += b"\n"
        kept.append(wanted + b"\n")
    return b"".join(kept)


def members_known_hosts(host_keys: dict[str, list[str]]) -> bytes:
    """known_hosts lines for every member, by private address: {address: ["ssh-ed25519 AAAA...", ...]}."""
    lines = [f"{address} {key}\n" for address, keys in host_keys.items() for key in keys]
    return "".join(lines).encode()


def _config_markers(cluster_name: str) -> tuple[str, str]:
    return (f"# BEGIN flambe cluster {cluster_name} (managed by flambe-deploy)",
            f"# END flambe cluster {cluster_name}")


def ssh_config_block(cluster_name: str, ssh_user: str, private_addresses: list[str]) -> str:
    begin, end = _config_markers(cluster_name)
    return "\n".join([
        begin,
        f"Host {' '.join(private_addresses)}",
        f"    User {ssh_user}",
        f"    IdentityFile ~/{CLUSTER_PRIVATE_KEY}",
        "    IdentitiesOnly yes",
        "    IdentityAgent none",
        "    ForwardAgent no",
        "    StrictHostKeyChecking yes",
        f"    UserKnownHostsFile ~/{MEMBERS_KNOWN_HOSTS}",
        # Ends the Host block, so the user's own options that follow keep applying to every host.
        "Host *",
        end,
        "",
    ])


def updated_ssh_config(current: bytes, block: str, cluster_name: str) -> bytes:
    """The config with the cluster's managed block first (ssh takes the first value it finds),
    replacing any earlier copy; the user's own lines are kept as they are."""
    begin, end = _config_markers(cluster_name)
    text = current.decode("utf-8", errors="surrogateescape")
    start = text.find(begin)
    if start != -1:
        stop = text.find(end, start)
        stop = len(text) if stop == -1 else text.find("\n", stop) + 1 or len(text)
        text = text[:start] + text[stop:]
    return (block + text).encode("utf-8", errors="surrogateescape")


def manifest(cluster_name: str, role: str, host_id: str, members: list[dict], key_fingerprint: str,
             resources: dict[str, dict[str, str]], version: str, extensions: dict[str, dict]) -> bytes:
    """~/.flambe/cluster.json: what this host is part of. It never holds a secret."""
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
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
