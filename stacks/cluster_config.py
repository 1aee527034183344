"""The stack's configuration, in the `flambe` namespace, read and checked before any resource is declared.

    pulumi config set flambe:name my-cluster
    pulumi config set flambe:creator alice
    pulumi config set flambe:keyName my-ec2-key-pair
    pulumi config set flambe:subnetId subnet-0abc
    pulumi config set --path 'flambe:securityGroupIds[0]' sg-0abc
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pulumi

from flambe_iac.errors import InputError
from flambe_iac.names import CLUSTER_NAME_RULE, check_cluster_name, check_ssh_user

NAMESPACE = "flambe"
CANONICAL = "099720109477"
DEFAULT_AMI_NAME = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
RESERVED_TAGS = ("creator", "Purpose", "Cluster-Name", "Role", "Name")
VOLUME_TYPES = ("gp2", "gp3", "io1", "io2", "st1", "sc1", "standard")


class StackConfigError(pulumi.RunError):
    """A configuration value is missing or wrong; the message says which key and how to set it."""


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    creator: str
    key_name: str
    subnet_id: str
    security_group_ids: list[str]
    orchestrator_type: str = "m5.large"
    factory_type: str = "m5.large"
    factory_count: int = 1
    ami: str | None = None
    ami_name: str = DEFAULT_AMI_NAME
    ami_owners: list[str] = field(default_factory=lambda: [CANONICAL])
    username: str = "ubuntu"
    volume_size: int = 100
    volume_type: str = "gp3"
    tags: dict[str, str] = field(default_factory=dict)
    iam_instance_profile: str | None = None
    spot_max_price: str | None = None  # set: factories are spot instances, at most this price ("" = on-demand cap)
    dedicated: bool = False
    associate_public_ip: bool = True
    orchestrator_idle_hours: float | None = None
    factories_idle_hours: float | None = None


def load_config(config: pulumi.Config | None = None) -> ClusterConfig:
    config = config or pulumi.Config(NAMESPACE)
    reader = _Reader(config)
    values = ClusterConfig(
        name=reader.name("name"),
        creator=reader.required("creator", "your name or team, for the creator tag"),
        key_name=reader.required("keyName", "the name of an existing EC2 key pair"),
        subnet_id=reader.required("subnetId", "an existing subnet, e.g. subnet-0abc"),
        security_group_ids=reader.string_list("securityGroupIds"),
        orchestrator_type=reader.optional("orchestratorType") or ClusterConfig.orchestrator_type,
        factory_type=reader.optional("factoryType") or ClusterConfig.factory_type,
        factory_count=reader.integer("factoryCount", ClusterConfig.factory_count, minimum=0),
        ami=reader.optional("ami"),
        ami_name=reader.optional("amiName") or DEFAULT_AMI_NAME,
        ami_owners=reader.optional_string_list("amiOwners") or [CANONICAL],
        username=reader.username("username"),
        volume_size=reader.integer("volumeSize", ClusterConfig.volume_size, minimum=8),
        volume_type=reader.choice("volumeType", VOLUME_TYPES, ClusterConfig.volume_type),
        tags=reader.tags("tags"),
        iam_instance_profile=reader.optional("iamInstanceProfile"),
        spot_max_price=reader.spot("spot"),
        dedicated=reader.boolean("dedicated", False),
        associate_public_ip=reader.boolean("associatePublicIp", True),
        orchestrator_idle_hours=reader.hours("orchestratorIdleHours"),
        factories_idle_hours=reader.hours("factoriesIdleHours"),
    )
    check_idle_hours(values)
    return values


def check_idle_hours(values: ClusterConfig) -> None:
    """Flambé's rule: the orchestrator never goes idle-terminated before the factories it drives."""
    orchestrator, factories = values.orchestrator_idle_hours, values.factories_idle_hours
    if orchestrator is None:
        return
    if factories is None:
        raise StackConfigError(
            f"{NAMESPACE}:orchestratorIdleHours is set but {NAMESPACE}:factoriesIdleHours is not: factories would "
            f"outlive their orchestrator. Set it, at most {orchestrator:g}: "
            f"pulumi config set {NAMESPACE}:factoriesIdleHours {orchestrator:g}"
        )
    if orchestrator < factories:
        raise StackConfigError(
            f"{NAMESPACE}:orchestratorIdleHours ({orchestrator:g}) is shorter than {NAMESPACE}:factoriesIdleHours "
            f"({factories:g}): the orchestrator must stay up at least as long as the factories"
        )


class _Reader:
    def __init__(self, config: pulumi.Config):
        self.config = config

    def fail(self, key: str, problem: str, how: str) -> StackConfigError:
        return StackConfigError(f"{NAMESPACE}:{key} {problem}: {how}")

    def optional(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.strip() if value and value.strip() else None

    def required(self, key: str, what: str) -> str:
        value = self.optional(key)
        if value is None:
            raise self.fail(key, f"is required ({what})", f"pulumi config set {NAMESPACE}:{key} VALUE")
        return value

    def name(self, key: str) -> str:
        value = self.required(key, "the cluster's name, used in instance names and tags")
        try:
            return check_cluster_name(value)
        except InputError:
            raise self.fail(key, f"is {value!r}", f"use {CLUSTER_NAME_RULE}") from None

    def username(self, key: str) -> str:
        value = self.optional(key) or ClusterConfig.username
        try:
            return check_ssh_user(value)
        except InputError as error:
            raise self.fail(key, f"is {value!r}", str(error)) from None

    def _object(self, key: str) -> Any:
        try:
            return self.config.get_object(key)
        except Exception:
            raise self.fail(key, "is not valid JSON or YAML",
                            f"set lists with --path, e.g. pulumi config set --path '{NAMESPACE}:{key}[0]' VALUE") from None

    def optional_string_list(self, key: str) -> list[str] | None:
        value = self._object(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
            raise self.fail(key, "must be a non-empty list of strings",
                            f"pulumi config set --path '{NAMESPACE}:{key}[0]' VALUE")
        return value

    def string_list(self, key: str) -> list[str]:
        value = self.optional_string_list(key)
        if value is None:
            raise self.fail(key, "is required (your existing security groups; flambe-iac never creates one)",
                            f"pulumi config set --path '{NAMESPACE}:{key}[0]' sg-0abc")
        return value

    def integer(self, key: str, default: int, minimum: int) -> int:
        value = self.config.get(key)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is None or number != int(number) or number < minimum:
            raise self.fail(key, f"is {value!r}", f"give a whole number >= {minimum}")
        return int(number)

    def hours(self, key: str) -> float | None:
        value = self.config.get(key)
        if value is None or value == "":
            return None
        try:
            hours = float(value)
        except ValueError:
            hours = 0
        if hours <= 0:
            raise self.fail(key, f"is {value!r}", "give a number of hours above 0, or leave it unset")
        return hours

    def boolean(self, key: str, default: bool) -> bool:
        value = self.config.get(key)
        if value is None or value == "":
            return default
        if value.lower() not in ("true", "false"):
            raise self.fail(key, f"is {value!r}", "give true or false")
        return value.lower() == "true"

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.optional(key) or default
        if value not in choices:
            raise self.fail(key, f"is {value!r}", f"use one of {', '.join(choices)}")
        return value

    def spot(self, key: str) -> str | None:
        value = self.optional(key)
        if value is None or value.lower() == "false":
            return None
        if value.lower() == "true":
            return ""
        try:
            if float(value) <= 0:
                raise ValueError
        except ValueError:
            raise self.fail(key, f"is {value!r}", "give true, false, or a maximum hourly price such as 0.25") from None
        return value

    def tags(self, key: str) -> dict[str, str]:
        value = self._object(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(item, (str, int, float)) for item in value.values()):
            raise self.fail(key, "must be an object of tag names to values",
                            f"pulumi config set --path '{NAMESPACE}:{key}.team' ml")
        reserved = sorted(set(value) & set(RESERVED_TAGS))
        if reserved:
            raise self.fail(key, f"sets {', '.join(reserved)}, which flambe-iac sets itself",
                            f"remove {'it' if len(reserved) == 1 else 'them'}; reserved: {', '.join(RESERVED_TAGS)}")
        return {str(name): str(item) for name, item in value.items()}
