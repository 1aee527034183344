"""Members that left: recorded in the hosts' manifests, gone from the cluster's source, and still holding its key.

A host dropped from a cluster file, or a factory replaced by `pulumi up --refresh`, keeps running with its copy of
the cluster key (and of the secrets) unless someone stops it. The members' manifests (~/.flambe/cluster.json) name
every member of the run that wrote them, and the key of that run: a member they name that the source no longer
lists has left, and while that key is not retired it can still log in to every member. The deploy rotates the key
then (unless told to keep it), so the member that left is refused from now on (invariant 10).

Only two fields of the manifest are read, on the host and within the one snapshot (the manifest also holds every
resource file's checksum, megabytes of it): the members' array and the key's fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flambe_iac.cluster import Cluster
from flambe_iac.engine.cluster_key import FINGERPRINT, fingerprint_or_none, parse_retired_list
from flambe_iac.remote_layout import CLUSTER_PUBLIC_KEY, MANIFEST, MEMBERS_KNOWN_HOSTS, RETIRED_KEYS
from flambe_iac.errors import InputError
from flambe_iac.names import check_address, check_host_id

MANIFEST_EXCERPT = "manifest members"
# The manifest is key-sorted JSON, one compact line (older ones were indented: whitespace goes first), so the two
# keys come before the resources' checksums: the first MiB holds them (4096 members take 300 KiB), and a manifest of
# a million files costs no more to read than a small one. Inside a JSON string every '"' is escaped, so
# '"members":[' only matches the key itself; its entries hold no ']'.
MANIFEST_HEAD = 1024 * 1024
MANIFEST_EXCERPT_COMMAND = (f"head -c {MANIFEST_HEAD} {MANIFEST} | tr -d ' \\t\\r\\n' | LC_ALL=C "
                            "grep -o -e '\"cluster_key_fingerprint\":\"[^\"]*\"' -e '\"members\":\\[[^]]*\\]' | "
                            "head -n 2")
EXCERPTS = ((MANIFEST_EXCERPT, MANIFEST_EXCERPT_COMMAND),)
MAX_RECORDED_MEMBERS = 4096


@dataclass(frozen=True, order=True)
class RecordedMember:
    id: str  # "" for a member known only by its address (pinned on the members, see `pinned_addresses`)
    private_ip: str

    def __str__(self) -> str:
        return f"{self.id} ({self.private_ip})" if self.id else self.private_ip


@dataclass(frozen=True)
class RecordedMembers:
    """What one host's manifest says: the members of the run that wrote it, and that run's cluster key."""

    members: frozenset[RecordedMember]
    fingerprint: str | None


def parse_manifest_excerpt(data: bytes | None) -> RecordedMembers | None:
    """The members and key fingerprint a host's manifest records (what MANIFEST_EXCERPT_COMMAND printed), or None
    when it records none or cannot be read. An entry that is not a valid (id, private_ip) is passed over: its name
    could not be shown, and a host that writes garbage there could as well have written nothing."""
    fields = {}
    for line in (data or b"").decode(errors="replace").splitlines():
        try:
            fields.update(json.loads("{" + line + "}"))
        except (ValueError, RecursionError):
            continue
    entries = fields.get("members")
    if not isinstance(entries, list):
        return None
    members = frozenset(filter(None, map(_recorded_member, entries[:MAX_RECORDED_MEMBERS])))
    fingerprint = fields.get("cluster_key_fingerprint")
    return RecordedMembers(members, fingerprint if isinstance(fingerprint, str) and FINGERPRINT.fullmatch(fingerprint)
                           else None)


def _recorded_member(entry: object) -> RecordedMember | None:
    if not isinstance(entry, dict):
        return None
    try:
        return RecordedMember(check_host_id(entry.get("id"), "id"), check_address(entry.get("private_ip"), "address"))
    except InputError:
        return None


def departed_members(snapshots, cluster: Cluster) -> list[RecordedMember]:
    """Members the reached hosts' manifests record alongside a key no member has retired, that CLUSTER (the source,
    as it is now) does not list as they were: by id and private address, so a new machine behind an old name or an
    old address counts as a departure too. SNAPSHOTS: the reached members' snapshots."""
    snapshots = list(snapshots)
    retired = set().union(*(parse_retired_list(snapshot.contents.get(RETIRED_KEYS)) for snapshot in snapshots))
    current = {RecordedMember(member.id, member.private_ip) for member in cluster.members}
    departed = set()
    for snapshot in snapshots:
        recorded = parse_manifest_excerpt(snapshot.excerpts.get(MANIFEST_EXCERPT))
        if recorded is not None and recorded.fingerprint not in retired:
            departed |= recorded.members - current
    # The manifest is written last: a run that handed out the key and failed later on every host (a setup command,
    # a resource) left none to say who got it. The members' pins are written with the key: an address pinned there
    # that the source no longer lists got the key too, while that host's key is not retired.
    named = {check_address(member.private_ip, "address") for member in current | departed}  # one form
    pinned = set().union(*(pinned_addresses(snapshot.contents.get(MEMBERS_KNOWN_HOSTS)) for snapshot in snapshots
                           if held_key(snapshot) not in retired))
    departed |= {RecordedMember("", address) for address in pinned - named}
    return sorted(departed)


def held_key(snapshot) -> str | None:
    """The fingerprint of the cluster key SNAPSHOT's host holds (written with its pins), or None."""
    return fingerprint_or_none((snapshot.contents.get(CLUSTER_PUBLIC_KEY) or b"").decode(errors="replace").strip())


def pinned_addresses(data: bytes | None) -> set[str]:
    """The member addresses a host's members' known hosts (written with the cluster key) pins; a line that does not
    start with an address is passed over."""
    found = set()
    for line in (data or b"").split(b"\n"):
        try:
            found.add(check_address(line.split(b" ", 1)[0].decode("ascii"), "address"))
        except (UnicodeDecodeError, InputError):
            continue
        if len(found) >= MAX_RECORDED_MEMBERS:
            break
    return found


def departure_note(departed: list[RecordedMember], rotated: bool, source: str, ray_token_kept: bool = False) -> str:
    """What the report and the summary say about members that left, and what the user can do. RAY_TOKEN_KEPT: the
    members hold a Ray token this run did not replace, which the members that left hold too."""
    names = ", ".join(map(str, departed[:5])) + (f" and {len(departed) - 5} more" if len(departed) > 5 else "")
    left = f"{len(departed)} member{'s' if len(departed) != 1 else ''} recorded on the hosts left the {source}: {names}"
    ray = (". Ray's token on the members was not replaced, and they may hold it too: with it they can run code "
           "through Ray on every member whenever Ray runs; replace it with `flambe-deploy ... --ray "
           "--rotate-cluster-key`") if ray_token_kept else ""
    if rotated:
        return (f"{left}. They still held the cluster key, so it was rotated (with --ray, Ray's token too): they are "
                "refused by every member's sshd from now on (keep it with --keep-cluster-key). Any ~/secret.ini they "
                f"received stays with them: rotate the credentials in it at their source{ray}")
    return (f"{left}. They STILL HOLD the cluster key and can log in to every member: it was kept because of "
            f"--keep-cluster-key. Stop them, or rotate it with `flambe-deploy ... --rotate-cluster-key`{ray}")
