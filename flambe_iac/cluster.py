"""The typed cluster model: every cluster source becomes a `Cluster` before anything connects."""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def members(self) -> tuple[Host, ...]:
        """The orchestrator first, then the factories in order."""
        return (self.orchestrator, *self.factories)
