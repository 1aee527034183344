"""Pinned host keys: which file every connection checks, and what it says about each member.

Sources, in order: `--known-hosts FILE`; else the per-cluster file under ~/.flambe/known_hosts/, written by an
earlier `--trust-on-first-use` (or from EC2 console output). The user's ~/.ssh/known_hosts is never read or written.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from flambe_iac.aws.console import console_keys_by_address
from flambe_iac.errors import InputError
from flambe_iac.names import refuse_unsafe_fields
from flambe_iac.local_files import write_atomically


@dataclass(frozen=True)
class HostKeyPolicy:
    known_hosts: Path
    trust_on_first_use: bool

    @property
    def strict_host_key_checking(self) -> str:
        return "accept-new" if self.trust_on_first_use else "yes"


def cluster_known_hosts_path(cluster_name: str) -> Path:
    return Path.home() / ".flambe" / "known_hosts" / cluster_name


@dataclass(frozen=True)
class ConsoleSource:
    """EC2 instances whose console output can vouch for their host keys: [(instance id, address)]."""

    region: str
    members: list[tuple[str, str]]
    timeout: float


def choose_host_key_policy(cluster_name: str, addresses: list[str], known_hosts: Path | None,
                           trust_on_first_use: bool, console: ConsoleSource | None = None) -> HostKeyPolicy:
    if known_hosts is not None:
        known_hosts = known_hosts.expanduser()
        if not known_hosts.is_file():
            raise InputError(f"--known-hosts {known_hosts}: no such file")
        require_keys_for(known_hosts, addresses, f"--known-hosts {known_hosts}")
        return HostKeyPolicy(known_hosts, trust_on_first_use=False)
    path = cluster_known_hosts_path(cluster_name)
    if trust_on_first_use:
        create_private_file(path)
        return HostKeyPolicy(path, trust_on_first_use=True)
    if console is not None:
        pin_from_console(path, console)
    if not path.exists():
        raise InputError(
            f"no pinned host keys for cluster {cluster_name!r}: give --known-hosts FILE with the hosts' keys, "
            "or --trust-on-first-use to accept and pin the keys the hosts present now"
        )
    require_keys_for(path, addresses, f"the pinned keys in {path}")
    return HostKeyPolicy(path, trust_on_first_use=False)


def pin_from_console(path: Path, console: ConsoleSource) -> None:
    """Pin, in the per-cluster file, the console-output keys of members it has no key for yet.

    Pins are kept per instance: each line carries its instance id as its comment. A pin for a member's address
    made for another instance (the address was reused after a `pulumi destroy` and `up`) is dropped, and the new
    instance is pinned afresh from its own console output.
    """

    forget_other_instances(path, console.members)
    entries = read_known_hosts(path) if path.exists() else []
    missing = [(instance_id, address) for instance_id, address in console.members if not keys_in(entries, address)]
    if not missing:
        return
    found = console_keys_by_address(console.region, missing, console.timeout)
    absent = [instance_id for instance_id, address in missing if address not in found]
    if absent:
        raise InputError(
            f"no host keys in the EC2 console output of {', '.join(absent)} within {console.timeout:g} s "
            "(cloud-init prints them a minute or two after boot): wait and retry, raise --host-key-timeout, "
            "or pass --known-hosts FILE or --trust-on-first-use"
        )
    ids = dict((address, instance_id) for instance_id, address in missing)
    for address, keys in found.items():
        fields = [field for key in keys for field in key.split()]
        refuse_unsafe_fields("pinned host keys", address, ids[address], *fields)
    create_private_file(path)
    with open(path, "a") as pinned:
        pinned.writelines(f"{address} {key} {ids[address]}\n" for address, keys in found.items() for key in keys)


def forget_other_instances(path: Path, members: list[tuple[str, str]]) -> None:
    """Drop the pins of MEMBERS' addresses that were made for another instance id than the member's."""
    if not path.exists():
        return
    by_address = {address: instance_id for instance_id, address in members}
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        fields = line.split()
        address = fields[0] if fields else ""
        if len(fields) >= 4 and address in by_address and fields[3] != by_address[address]:
            continue  # pinned for an instance that no longer holds this address
        kept.append(line)
    if kept != lines:
        write_atomically(path, "".join(kept))


def create_private_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)


def require_keys_for(known_hosts: Path, addresses: list[str], source: str) -> None:
    entries = read_known_hosts(known_hosts)
    missing = [address for address in addresses if not keys_in(entries, address)]
    if missing:
        raise InputError(
            f"{source} has no host key for {', '.join(missing)}: add them to that file, "
            "or use --trust-on-first-use to accept and pin the keys these hosts present now"
        )


@dataclass(frozen=True)
class KnownHostsEntry:
    patterns: tuple[str, ...]
    key: str  # "ssh-ed25519 AAAA..."

    def matches(self, address: str) -> bool:
        return any(_pattern_matches(pattern, address) for pattern in self.patterns)


def read_known_hosts(path: Path) -> list[KnownHostsEntry]:
    entries = []
    for line in Path(path).read_text(errors="replace").splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#") or fields[0].startswith("@") or len(fields) < 3:
            continue
        entries.append(KnownHostsEntry(tuple(fields[0].split(",")), f"{fields[1]} {fields[2]}"))
    return entries


def keys_in(entries: list[KnownHostsEntry], address: str) -> list[str]:
    return [entry.key for entry in entries if entry.matches(address)]


def _pattern_matches(pattern: str, address: str) -> bool:
    names = (address, f"[{address}]:22")
    if not pattern.startswith("|1|"):
        return pattern in names
    salt, _, digest = pattern[3:].partition("|")
    try:
        key = base64.b64decode(salt, validate=True)
    except ValueError:  # binascii.Error: a damaged hashed entry matches nothing
        return False
    return any(hmac.compare_digest(base64.b64encode(hmac.new(key, name.encode(), hashlib.sha1).digest()),
                                   digest.encode()) for name in names)
