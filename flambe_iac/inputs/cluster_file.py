"""Hosts the user already has, in Flambé's SSHCluster shape:

    name: my-cluster
    orchestrator_ip: [54.1.2.3, 10.0.0.4]     # [public, private], or one address for both
    factories_ips: [[54.1.2.4, 10.0.0.5], 10.0.0.6]
    key: ~/.ssh/id_ed25519
    username: ubuntu

Flambé's `!SSHCluster` tag is accepted; the file is read with a safe loader.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flambe_iac.cluster import FACTORY, ORCHESTRATOR, Cluster, Host
from flambe_iac.errors import InputError
from flambe_iac.names import check_address

KNOWN_KEYS = {"name", "orchestrator_ip", "factories_ips", "key", "username", "setup_cmds"}


@dataclass(frozen=True)
class ClusterSource:
    cluster: Cluster
    key: Path | None  # the key the file names
    setup_commands: tuple[str, ...] = ()


def load_cluster_file(path: Path) -> ClusterSource:
    class SafeLoaderWithFlambeTags(yaml.SafeLoader):
        pass

    SafeLoaderWithFlambeTags.add_constructor(
        "!SSHCluster", lambda loader, node: loader.construct_mapping(node, deep=True))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read cluster file {path}: {getattr(error, 'strerror', None) or error}") from None
    try:
        document = yaml.load(text, Loader=SafeLoaderWithFlambeTags)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"cluster file {path} is not valid YAML{where}") from None
    except (RecursionError, ValueError, TypeError):  # nested too deep, or keys no mapping can hold
        raise InputError(f"cluster file {path} is not a Flambé cluster file: nested too deep") from None
    return parse_cluster_file(document, str(path))


def parse_cluster_file(document: Any, source: str) -> ClusterSource:
    if not isinstance(document, dict):
        raise InputError(f"{source}: expected a mapping with name, orchestrator_ip, factories_ips, key, username")
    for unknown in sorted(set(document) - KNOWN_KEYS, key=str):
        # Flambé's SSHCluster has keys that mean nothing here (and a typo looks the same): say so, go on.
        print(f"flambe-deploy: warning: {source}: ignoring {unknown!r} (flambe-deploy reads "
              f"{', '.join(sorted(KNOWN_KEYS))})", file=sys.stderr)
    setup = document.get("setup_cmds") or []
    if not isinstance(setup, list) or not all(isinstance(command, str) and command.strip() for command in setup):
        raise InputError(f"{source}: 'setup_cmds' must be a list of shell commands")
    for required in ("name", "orchestrator_ip", "username"):
        if document.get(required) in (None, ""):
            raise InputError(f"{source}: {required!r} is missing")
    for text_key in ("name", "username", "key"):
        if document.get(text_key) is not None and not isinstance(document[text_key], str):
            raise InputError(f"{source}: {text_key!r} must be a string")
    factories = document.get("factories_ips") or []
    if not isinstance(factories, list):
        raise InputError(f"{source}: 'factories_ips' must be a list of addresses or [public, private] pairs")
    orchestrator = _host(document["orchestrator_ip"], "orchestrator_ip", ORCHESTRATOR, source)
    hosts = tuple(_host(entry, f"factories_ips[{index}]", FACTORY, source) for index, entry in enumerate(factories))
    try:
        cluster = Cluster(name=document["name"], ssh_user=document["username"], region=None,
                          orchestrator=orchestrator, factories=hosts)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    key = document.get("key")
    if key is not None and not (isinstance(key, str) and key and "\0" not in key):
        raise InputError(f"{source}: 'key' must be the path of a private key, not {key!r}")
    return ClusterSource(cluster, Path(key).expanduser() if key else None, tuple(setup))


def _host(entry: Any, field: str, role: str, source: str) -> Host:
    addresses = entry if isinstance(entry, list) else [entry]
    if not 1 <= len(addresses) <= 2:
        raise InputError(f"{source}: {field!r} must be an address or a [public, private] pair")
    normalized = []
    for address in addresses:
        try:
            normalized.append(check_address(str(address), field))
        except InputError:
            raise InputError(f"{source}: {field!r} has {address!r}, which is not an IP address (IPv4, or IPv6 "
                             "without a zone id)") from None
    public, private = normalized[0], normalized[-1]
    return Host(id=private, role=role, private_ip=private, public_ip=public)
