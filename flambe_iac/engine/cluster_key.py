"""The cluster's own key pair: made, kept, rotated, retired; and the authorized_keys edits that go with it.

The hosts are the state. Each holds the key pair (~/ray_bootstrap_key.pem and .pub) and the list of keys the
cluster has retired (~/.flambe/retired_cluster_keys, fingerprints). A key that any member has retired is never
chosen again, so no re-run, from any machine, can bring back a key a rotation replaced (invariant 10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flambe_iac.remote_layout import CLUSTER_PUBLIC_KEY, RETIRED_KEYS
from flambe_iac.errors import InputError
from flambe_iac.names import refuse_unsafe_fields
from flambe_iac.ssh.user_key import public_key_fingerprint

KEPT, CREATED, ROTATED = "kept", "created", "rotated"
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


@dataclass(frozen=True)
class ClusterKey:
    private_openssh: bytes
    public_line: str  # "ssh-ed25519 AAAA... flambe-cluster:NAME"

    @property
    def fingerprint(self) -> str:
        return public_key_fingerprint(self.public_line)

    def __repr__(self) -> str:
        return f"ClusterKey({self.fingerprint})"


def cluster_key_comment(cluster_name: str) -> str:
    """The comment on the cluster's public key: it names the cluster, and marks lines we may remove."""
    return f"flambe-cluster:{cluster_name}"


def new_cluster_key(comment: str) -> ClusterKey:
    """A fresh ed25519 key pair, made in memory: the private key only ever lands on the cluster's hosts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_key = Ed25519PrivateKey.generate()
    private_openssh = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return ClusterKey(private_openssh, f"{public.decode()} {comment}")


def cluster_key_from_private(private_openssh: bytes, comment: str) -> ClusterKey:
    """The key pair a host already holds, its public half derived again from the private key."""
    from cryptography.hazmat.primitives import serialization

    private_key = serialization.load_ssh_private_key(private_openssh, password=None)
    public = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return ClusterKey(private_openssh, f"{public.decode()} {comment}")


def same_public_key(line_a: str, line_b: str) -> bool:
    """Whether two public key lines hold the same key, whatever their comments."""
    return line_a.split()[:2] == line_b.split()[:2]


def fingerprint_or_none(public_line: str) -> str | None:
    try:
        return public_key_fingerprint(public_line)
    except (IndexError, ValueError):
        return None


# -- which key the cluster has


@dataclass(frozen=True)
class HeldKey:
    """What one member says about the cluster key: the public key it holds (if any), and what it has retired."""

    host: object  # the caller's handle for the member (a pyinfra host)
    is_orchestrator: bool
    public_line: str | None
    retired: frozenset[str] = frozenset()


@dataclass
class KeyDecision:
    action: str  # KEPT, CREATED or ROTATED
    keep: str | None  # the fingerprint to keep (KEPT), fetched from one of `sources`
    sources: list = field(default_factory=list)  # members holding `keep`, the orchestrator first
    retired: set[str] = field(default_factory=set)  # every fingerprint the cluster has retired, after this run
    note: str | None = None  # something the user should know, e.g. a split the run repairs


def decide_cluster_key(held: list[HeldKey], rotate: bool) -> KeyDecision:
    """Keep the one key the members hold that no member has retired; make one if there is none; rotate on request.

    More than one unretired key (two deploys raced on a fresh cluster before the lock existed) keeps the
    orchestrator's, else the one most members hold, and retires the others.
    """
    retired = set().union(*(member.retired for member in held)) if held else set()
    holders: dict[str, list[HeldKey]] = {}
    for member in sorted(held, key=lambda member: not member.is_orchestrator):
        fingerprint = fingerprint_or_none(member.public_line or "")
        if fingerprint:
            holders.setdefault(fingerprint, []).append(member)
    eligible = {fingerprint: members for fingerprint, members in holders.items() if fingerprint not in retired}
    if rotate:
        return KeyDecision(ROTATED if holders else CREATED, None, [], retired | set(holders))
    if not eligible:
        note = "every key the members hold was retired earlier; a new key replaces it" if holders else None
        return KeyDecision(CREATED, None, [], retired | set(holders), note)
    # The orchestrator's key, else the one most members hold; ties by fingerprint, so the choice never depends on
    # which member answered first.
    keep = max(eligible, key=lambda fingerprint: (eligible[fingerprint][0].is_orchestrator,
                                                  len(eligible[fingerprint]), fingerprint))
    others = set(holders) - {keep}
    note = None
    if len(eligible) > 1:
        note = f"the members held {len(eligible)} different cluster keys; kept {keep} and retired the others"
    return KeyDecision(KEPT, keep, [member.host for member in eligible[keep]], retired | others, note)


@dataclass(frozen=True)
class SettledKey:
    """The key this run installs, and what the cluster has retired after it."""

    key: ClusterKey
    retired: set[str]
    action: str
    note: str | None


def settle_cluster_key(snapshots: dict, orchestrator, rotate: bool, cluster_name: str, fetch_private) -> SettledKey:
    """Keep the key the hosts hold (the hosts are the state), or make one; and what is retired.

    SNAPSHOTS maps each reached member's handle to its snapshot; FETCH_PRIVATE(handle) returns the private key file's
    bytes on that member, or None. A copy that cannot be read or does not match is passed over."""
    held = [HeldKey(host, host is orchestrator,
                    (snapshot.contents.get(CLUSTER_PUBLIC_KEY) or b"").decode(errors="replace").strip() or None,
                    parse_retired_list(snapshot.contents.get(RETIRED_KEYS)))
            for host, snapshot in snapshots.items()]
    decision = decide_cluster_key(held, rotate)
    comment = cluster_key_comment(cluster_name)
    key = next(filter(None, (matching_key(fetch_private(host), decision.keep, comment) for host in decision.sources)),
               None)
    if decision.keep and key is None:
        decision.note = f"no member could hand over the cluster key {decision.keep}; a new key replaces it"
        decision.action, decision.retired = ROTATED, decision.retired | {decision.keep}
    key = key or new_cluster_key(comment)
    return SettledKey(key, decision.retired - {key.fingerprint}, decision.action, decision.note)


def matching_key(private_openssh: bytes | None, fingerprint: str, comment: str) -> ClusterKey | None:
    if private_openssh is None:
        return None
    try:
        key = cluster_key_from_private(private_openssh, comment)
    except (ValueError, TypeError):
        return None  # unreadable or damaged: another host's copy, or a new key, will do
    return key if key.fingerprint == fingerprint else None


# -- authorized_keys


def key_fields(line: bytes) -> tuple[str, str] | None:
    """(type, base64) of the key on an authorized_keys line, after its options if any (sshd's own reading: an options
    field may hold double-quoted values with spaces, such as command="...")."""
    text = line.strip()
    if not text.startswith((b"ssh-", b"ecdsa-", b"sk-")):
        text = _after_options(text)
    fields = text.split()
    if len(fields) >= 2 and fields[0].startswith((b"ssh-", b"ecdsa-", b"sk-")) and fields[1].startswith(b"AAAA"):
        return fields[0].decode(errors="replace"), fields[1].decode(errors="replace")
    return None


def _after_options(text: bytes) -> bytes:
    quoted, escaped = False, False
    for index, byte in enumerate(text):
        if escaped:
            escaped = False
        elif byte == ord("\\"):
            escaped = True
        elif byte == ord('"'):
            quoted = not quoted
        elif byte in b" \t" and not quoted:
            return text[index:]
    return b""


def updated_authorized_keys(current: bytes, public_line: str, cluster_name: str, protected: str | None = None) -> bytes:
    """authorized_keys with exactly one key of this cluster, the given one; every other line byte-identical.

    Only lines flambe wrote are ever removed: those that end with this cluster's comment and hold another key (an
    old cluster key, a retired one included). A line without the comment is the user's, whatever its key; and the
    PROTECTED key (the user's own, "type base64") is never removed, whatever its line says.
    """
    comment = cluster_key_comment(cluster_name)
    refuse_unsafe_fields("authorized_keys", comment, *public_line.split())
    if public_line.split()[2:] != [comment]:
        raise InputError(f"refusing to write authorized_keys: {public_line!r} is not a key with the comment {comment}")
    wanted = public_line.strip().encode()
    kept, has_wanted = [], False
    for line in current.splitlines(keepends=True):
        ours = line.strip().split()[-1:] == [comment.encode()]
        if ours and protected and key_fields(line) == tuple(protected.split()[:2]):
            ours = False
        if ours:
            if key_fields(line) == tuple(public_line.split()[:2]) and not has_wanted:
                kept.append(line)  # the cluster key, as it is, the user's restrictions (from="...") included
                has_wanted = True
            continue
        kept.append(line)
    if not has_wanted:
        if kept and not kept[-1].endswith(b"\n"):
            kept[-1] += b"\n"
        kept.append(wanted + b"\n")
    return b"".join(kept)


def retired_list(fingerprints: set[str]) -> bytes:
    """~/.flambe/retired_cluster_keys: one fingerprint a line, sorted, so every host's copy is identical."""
    for fingerprint in fingerprints:
        refuse_unsafe_fields("retired cluster keys", fingerprint)
    return "".join(f"{fingerprint}\n" for fingerprint in sorted(fingerprints)).encode()


def parse_retired_list(content: bytes | None) -> frozenset[str]:
    """The fingerprints a host lists as retired; anything else on it is ignored."""
    words = (content or b"").decode(errors="replace").split()
    return frozenset(word for word in words if FINGERPRINT.fullmatch(word))
