"""Stack outputs, contract v1: the only thing `stacks/` and the driver share.

It is what `pulumi stack output --json --show-secrets` prints, and what `flambe-lab up` writes:

    {"flambe_outputs_version": 1, "cluster_name": ..., "ssh_user": ..., "region": ...,
     "orchestrator": {"id", "public_ip", "private_ip", "public_dns"}, "factories": [{...}, ...]}

A host entry may also say where it landed (optional, a compatible v1 addition: documents without them still load):
"instance_type" ("p4d.24xlarge"), "availability_zone" ("us-east-1b") and "market" ("on-demand", "spot" or
"capacity-block").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flambe_iac.cluster import FACTORY, ORCHESTRATOR, PLACEMENT_RULES, Cluster, Host, check_placement
from flambe_iac.errors import InputError
from flambe_iac.names import check_address, check_host_id

VERSION_KEY = "flambe_outputs_version"
VERSION = 1
MASKED = "[secret]"
HOST_KEYS = ("id", "public_ip", "private_ip", "public_dns")
PLACEMENT_KEYS = tuple(PLACEMENT_RULES)  # optional: written only when known
MAX_AUTOSTOP_MINUTES = 7 * 24 * 60


def load_outputs(path: Path) -> Cluster:
    """Read a contract v1 file into a `Cluster`, or raise an InputError that says what to fix."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read stack outputs {path}: {getattr(error, 'strerror', None) or 'not UTF-8'}") \
            from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path} is not JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "write it with `pulumi stack output --json --show-secrets > outputs.json`"
        ) from None
    except (ValueError, RecursionError):
        raise InputError(f"{path} is not stack outputs: nested too deep, or a number too long to read") from None
    return parse_outputs(document, source=str(path))


def parse_outputs(document: Any, source: str = "stack outputs") -> Cluster:
    """Turn a decoded contract v1 document into a `Cluster`."""
    masked = _masked_paths(document)
    if masked:
        raise InputError(
            f"{source} has masked secret values at {', '.join(masked)}: "
            "add --show-secrets (`pulumi stack output --json --show-secrets`)"
        )
    reader = _Reader(source)
    document = reader.mapping(document, "")
    reader.check_version(document)
    orchestrator = reader.host(document.get("orchestrator"), "orchestrator", ORCHESTRATOR)
    factories = reader.sequence(document.get("factories"), "factories")
    name = reader.text(document.get("cluster_name"), "cluster_name")
    ssh_user = reader.text(document.get("ssh_user"), "ssh_user")
    region = reader.optional_text(document.get("region"), "region")
    hosts = tuple(reader.host(entry, f"factories[{index}]", FACTORY) for index, entry in enumerate(factories))
    autostop = reader.optional_minutes(document.get("autostop_minutes"), "autostop_minutes")
    try:
        return Cluster(name=name, ssh_user=ssh_user, region=region, orchestrator=orchestrator, factories=hosts,
                       autostop_minutes=autostop)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None


def contract_document(cluster_name: Any, ssh_user: Any, region: Any, orchestrator: Any, factories: list,
                      autostop_minutes: Any = None) -> dict:
    """The contract v1 document, key by key: the one builder, for `stacks/` (whose values are Pulumi outputs)
    and for the lab (plain values). autostop_minutes is optional: older outputs lack it."""
    document = {
        VERSION_KEY: VERSION,
        "cluster_name": cluster_name,
        "ssh_user": ssh_user,
        "region": region,
        "orchestrator": orchestrator,
        "factories": factories,
    }
    if autostop_minutes is not None:
        document["autostop_minutes"] = autostop_minutes
    return document


def outputs_document(cluster: Cluster) -> dict[str, Any]:
    """The contract v1 document for a cluster: the inverse of `parse_outputs`."""
    def host_entry(host: Host) -> dict[str, Any]:
        entry = {key: getattr(host, key) for key in HOST_KEYS}
        return entry | {key: getattr(host, key) for key in PLACEMENT_KEYS if getattr(host, key) is not None}

    return contract_document(cluster.name, cluster.ssh_user, cluster.region, host_entry(cluster.orchestrator),
                             [host_entry(host) for host in cluster.factories], cluster.autostop_minutes)


def _masked_paths(value: Any, path: str = "") -> list[str]:
    if value == MASKED:
        return [path or "(top level)"]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _masked_paths(item, _join(path, key))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _masked_paths(item, f"{path}[{index}]")]
    return []


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    """Typed reads of one document; each failure names the field and the source."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, problem: str) -> InputError:
        where = f"field {field!r}" if field else "the top level"
        return InputError(f"{self.source}: {where} {problem}")

    def check_version(self, document: dict) -> None:
        version = document.get(VERSION_KEY)
        if version is None:
            raise self.fail(
                VERSION_KEY,
                "is missing: this is not flambe stack outputs (export them from the flambe Pulumi program)",
            )
        # Pulumi hands numbers over as floats, so 1.0 is version 1.
        if isinstance(version, bool) or not isinstance(version, (int, float)) or version != VERSION:
            raise self.fail(
                VERSION_KEY, f"is {version!r}, a version this flambe-iac does not know (it reads {VERSION})"
            )

    def mapping(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, not {_type_name(value)}")
        return value

    def sequence(self, value: Any, field: str) -> list:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, not {_type_name(value)}")
        return value

    def text(self, value: Any, field: str) -> str:
        if value is None:
            raise self.fail(field, "is missing")
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"must be a non-empty string, not {value!r}")
        return value

    def optional_text(self, value: Any, field: str) -> str | None:
        return None if value is None else self.text(value, field)

    def optional_minutes(self, value: Any, field: str) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_AUTOSTOP_MINUTES:
            raise self.fail(field, f"must be a number of minutes above 0 and at most {MAX_AUTOSTOP_MINUTES}, "
                                   f"not {value!r}")
        return float(value)

    def address(self, value: Any, field: str) -> str:
        text = self.text(value, field)
        try:
            return check_address(text, field)
        except InputError as error:
            raise self.fail(field, str(error).removeprefix(f"{field} ")) from None

    def host(self, value: Any, field: str, role: str) -> Host:
        entry = self.mapping(value, field)
        public_ip = entry.get("public_ip")
        host_id = self.text(entry.get("id"), f"{field}.id")
        try:
            check_host_id(host_id, "")
        except InputError:
            raise self.fail(f"{field}.id", f"is {host_id!r}, which is not allowed: use letters, digits, '_', '.', ':' and '-'") from None
        return Host(
            id=host_id,
            role=role,
            private_ip=self.address(entry.get("private_ip"), f"{field}.private_ip"),
            public_ip=None if public_ip is None else self.address(public_ip, f"{field}.public_ip"),
            public_dns=self.optional_text(entry.get("public_dns") or None, f"{field}.public_dns"),
            **{key: self.placement(key, entry.get(key), f"{field}.{key}") for key in PLACEMENT_KEYS},
        )

    def placement(self, key: str, value: Any, field: str) -> str | None:
        if value is None:
            return None
        try:
            return check_placement(key, value, "")
        except InputError as error:
            raise self.fail(field, str(error).strip()) from None


def _type_name(value: Any) -> str:
    if value is None:
        return "missing"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
