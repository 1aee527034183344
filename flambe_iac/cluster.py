"""The typed cluster model: every cluster source becomes a `Cluster` before anything connects."""

from __future__ import annotations

from dataclasses import dataclass

from flambe_iac.inputs.names import check_address, check_cluster_name, check_host_id, check_ssh_user

ORCHESTRATOR = "orchestrator"
FACTORY = "factory"

PUBLIC = "public"
PRIVATE = "private"
ADDRESS_KINDS = (PUBLIC, PRIVATE)


@dataclass(frozen=True)
class Host:
    id: str
    role: str
    private_ip: str
    public_ip: str | None = None
    public_dns: str | None = None

    def __post_init__(self):
        check_host_id(self.id, "host id")
        check_address(self.private_ip, f"private address of {self.id}")
        if self.public_ip is not None:
            check_address(self.public_ip, f"public address of {self.id}")

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
