"""The typed cluster model: every cluster source becomes a `Cluster` before anything connects."""

from __future__ import annotations

import re
from dataclasses import dataclass

from flambe_iac.errors import InputError
from flambe_iac.names import _shown as shown_value
from flambe_iac.names import check_address, check_cluster_name, check_host_id, check_ssh_user

ORCHESTRATOR = "orchestrator"
FACTORY = "factory"

PUBLIC = "public"
PRIVATE = "private"
ADDRESS_KINDS = (PUBLIC, PRIVATE)

# Where a member landed (contract v1's optional placement keys): checked shapes, so nothing else reaches a report or
# a terminal. EC2's types are family.size ("p4d.24xlarge", "u-6tb1.metal"); zones are region-letter, local zones too
# ("us-east-1b", "us-west-2-lax-1a").
INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]{0,30}\.[a-z0-9-]{1,30}")
AVAILABILITY_ZONE = re.compile(r"[a-z]{2}(-[a-z0-9]{1,20}){2,6}")
MARKETS = ("on-demand", "spot", "capacity-block")
PLACEMENT_RULES = {
    "instance_type": (INSTANCE_TYPE.fullmatch, "an EC2 instance type such as p4d.24xlarge"),
    "availability_zone": (AVAILABILITY_ZONE.fullmatch, "an Availability Zone such as us-east-1b"),
    "market": (MARKETS.__contains__, f"one of {', '.join(MARKETS)}"),
}


def check_placement(key: str, value: object, where: str) -> str:
    """One of a host's placement values (PLACEMENT_RULES' keys), or an InputError that says what it must be."""
    matches, rule = PLACEMENT_RULES[key]
    if not isinstance(value, str) or not matches(value):
        raise InputError(f"{where} must be {rule}, not {shown_value(value)}")
    return value


@dataclass(frozen=True)
class Host:
    id: str
    role: str
    private_ip: str
    public_ip: str | None = None
    public_dns: str | None = None
    instance_type: str | None = None  # where it landed, when the source says (contract v1's optional keys)
    availability_zone: str | None = None
    market: str | None = None  # "on-demand", "spot" or "capacity-block"

    def __post_init__(self):
        check_host_id(self.id, "host id")
        check_address(self.private_ip, f"private address of {self.id}")
        if self.public_ip is not None:
            check_address(self.public_ip, f"public address of {self.id}")
        for key in PLACEMENT_RULES:
            if getattr(self, key) is not None:
                check_placement(key, getattr(self, key), f"{key} of {self.id}")

    @property
    def placement(self) -> str:
        """Where it landed, in words: "p4d.24xlarge us-east-1b spot", as much as is known ("" when nothing is)."""
        return " ".join(filter(None, (self.instance_type, self.availability_zone, self.market)))

    def address(self, kind: str) -> str | None:
        """The address to reach this host by: `public` or `private`."""
        if kind == PUBLIC:
            return self.public_ip
        if kind == PRIVATE:
            return self.private_ip
        raise ValueError(f"address kind must be one of {ADDRESS_KINDS}, not {kind!r}")


@dataclass(frozen=True)
class Cluster:
    name: str
    ssh_user: str
    region: str | None
    orchestrator: Host
    factories: tuple[Host, ...]
    autostop_minutes: float | None = None  # the stack's flambe:autostopMinutes, which the outputs carry

    def __post_init__(self):
        """Every name that reaches a host passes the allow-lists here, whatever the cluster's source."""
        check_cluster_name(self.name)
        check_ssh_user(self.ssh_user)

    @property
    def members(self) -> tuple[Host, ...]:
        """The orchestrator first, then the factories in order."""
        return (self.orchestrator, *self.factories)
