"""The stack's configuration, in the `flambe` namespace, read and checked before any resource is declared.

    pulumi config set flambe:name my-cluster
    pulumi config set flambe:creator alice
    pulumi config set flambe:keyName my-ec2-key-pair
    pulumi config set --path 'flambe:subnetIds[0]' subnet-0abc     # one subnet per Availability Zone you allow
    pulumi config set --path 'flambe:securityGroupIds[0]' sg-0abc
    pulumi config set --path 'flambe:factoryTypes[0]' p5.48xlarge  # the most wanted first
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pulumi

from flambe_iac.errors import InputError
from flambe_iac.names import CLUSTER_NAME_RULE, check_cluster_name, check_ssh_user

NAMESPACE = "flambe"
CANONICAL = "099720109477"
DEFAULT_AMI_NAME = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-*"  # {arch}: amd64 or arm64
# AWS's Deep Learning Base AMI with the NVIDIA driver, CUDA and Docker on Ubuntu 22.04: the default for factories of
# an instance type with GPUs. {arm}: "ARM64 " on Graviton GPU types.
AMAZON = "amazon"
DEFAULT_GPU_AMI_NAME = "Deep Learning {arm}Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
RESERVED_TAGS = ("creator", "Purpose", "Cluster-Name", "Role", "Name")
BOOT_VOLUME_TYPES = ("gp2", "gp3", "io1", "io2", "standard")  # st1 and sc1 cannot be root volumes
PROVISIONED_IOPS_TYPES = ("io1", "io2")
IDLE_ACTIONS = ("terminate", "stop")
PLACEMENT_STRATEGIES = ("cluster", "spread", "partition")
MAX_PARTITIONS = 7  # AWS: a partition placement group has at most 7 partitions per Availability Zone
MAX_SPREAD_INSTANCES = 7  # AWS: a spread placement group holds at most 7 running instances per Availability Zone
DEFAULT_TYPE = "m5.large"
MAX_IDLE_HOURS = 7 * 24  # CloudWatch looks back at most 7 days (hour-long periods)
MAX_OVERRIDES = 50  # EC2 Fleet: at most 50 overrides (types x subnets) in one launch template config
SPOT_MODES = ("off", "spot", "fallback")  # fallback: spot for every factory, else on-demand for every factory


class StackConfigError(pulumi.RunError):
    """A configuration value is missing or wrong; the message says which key and how to set it."""


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    creator: str
    key_name: str
    subnet_ids: list[str]  # ordered, one per Availability Zone, all of one VPC
    security_group_ids: list[str]
    orchestrator_types: list[str] = field(default_factory=lambda: ["m5.large"])  # ordered, the most wanted first
    factory_types: list[str] = field(default_factory=lambda: ["m5.large"])
    factory_count: int = 1
    ami: str | None = None
    ami_name: str | None = None  # None: Ubuntu 24.04 LTS for the instance type's architecture
    ami_owners: list[str] = field(default_factory=lambda: [CANONICAL])
    factory_ami: str | None = None
    factory_ami_name: str | None = None  # None: as the orchestrator's, or the Deep Learning GPU AMI for GPU types
    factory_ami_owners: list[str] | None = None
    refresh_ami: bool = False  # False: a factory added later boots the image the cluster's instances already run
    username: str = "ubuntu"
    volume_size: int = 100
    volume_type: str = "gp3"
    volume_iops: int | None = None
    kms_key_id: str | None = None  # None: EBS's default key; root volumes are encrypted either way
    tags: dict[str, str] = field(default_factory=dict)
    iam_instance_profile: str | None = None
    spot_mode: str = "off"  # off, spot, or fallback (spot, else on-demand: never a mix)
    spot_max_price: str | None = None  # with spot_mode spot or fallback: at most this hourly price (None: on-demand's)
    capacity_reservation_id: str | None = None  # the factories launch into this On-Demand Capacity Reservation
    capacity_reservation_group_arn: str | None = None  # or into this resource group of reservations
    capacity_block: bool = False  # True: capacity_reservation_id is an EC2 Capacity Block for ML
    dedicated: bool = False
    associate_public_ip: bool = True
    orchestrator_idle_hours: float | None = None
    factories_idle_hours: float | None = None
    orchestrator_idle_cpu: float = 2.0  # percent: below this average, the orchestrator counts as idle
    factories_idle_cpu: float = 0.5  # Flambé's value: one busy core of a 48-vCPU machine is ~2 %, so never idle
    idle_action: str = "terminate"
    placement_group: str | None = None  # cluster, spread or partition: one placement group for the factories
    partition_count: int | None = None  # with partition: AWS's default is 2
    placement_orchestrator: bool = False  # True: the orchestrator joins the placement group too
    efa: bool = False  # True: each factory gets every EFA interface its type has (needs a cluster placement group)
    autostop_minutes: float | None = None  # the outputs carry it: flambe-deploy installs the agent with it


def load_config(config: pulumi.Config | None = None) -> ClusterConfig:
    config = config or pulumi.Config(NAMESPACE)
    reader = _Reader(config)
    values = ClusterConfig(
        name=reader.name("name"),
        creator=reader.required("creator", "your name or team, for the creator tag"),
        key_name=reader.required("keyName", "the name of an existing EC2 key pair"),
        subnet_ids=reader.preference_list("subnetIds", "subnetId", None),
        security_group_ids=reader.string_list("securityGroupIds"),
        orchestrator_types=reader.preference_list("orchestratorTypes", "orchestratorType", DEFAULT_TYPE),
        factory_types=reader.preference_list("factoryTypes", "factoryType", DEFAULT_TYPE),
        factory_count=reader.integer("factoryCount", ClusterConfig.factory_count, minimum=0),
        ami=reader.optional("ami"),
        ami_name=reader.optional("amiName"),
        ami_owners=reader.optional_string_list("amiOwners") or [CANONICAL],
        factory_ami=reader.optional("factoryAmi"),
        factory_ami_name=reader.optional("factoryAmiName"),
        factory_ami_owners=reader.optional_string_list("factoryAmiOwners"),
        refresh_ami=reader.boolean("refreshAmi", False),
        username=reader.username("username"),
        volume_size=reader.integer("volumeSize", ClusterConfig.volume_size, minimum=8),
        volume_type=reader.volume_type("volumeType"),
        volume_iops=reader.optional_integer("volumeIops", minimum=100),
        kms_key_id=reader.optional("kmsKeyId"),
        tags=reader.tags("tags"),
        iam_instance_profile=reader.optional("iamInstanceProfile"),
        spot_mode=reader.spot_mode("spot"),
        spot_max_price=reader.spot_price("spot"),
        capacity_reservation_id=reader.optional("capacityReservationId"),
        capacity_reservation_group_arn=reader.optional("capacityReservationGroupArn"),
        capacity_block=reader.boolean("capacityBlock", False),
        dedicated=reader.boolean("dedicated", False),
        associate_public_ip=reader.boolean("associatePublicIp", True),
        orchestrator_idle_hours=reader.hours("orchestratorIdleHours"),
        factories_idle_hours=reader.hours("factoriesIdleHours"),
        orchestrator_idle_cpu=reader.percent("orchestratorIdleCpu", ClusterConfig.orchestrator_idle_cpu),
        factories_idle_cpu=reader.percent("factoriesIdleCpu", ClusterConfig.factories_idle_cpu),
        idle_action=reader.choice("idleAction", IDLE_ACTIONS, ClusterConfig.idle_action),
        placement_group=reader.placement_strategy("placementGroup"),
        partition_count=reader.optional_integer("partitionCount", minimum=1),
        placement_orchestrator=reader.boolean("placementOrchestrator", False),
        efa=reader.boolean("efa", False),
        autostop_minutes=reader.minutes("autostopMinutes"),
    )
    check_idle_hours(values)
    check_placement(values)
    check_volume(values)
    check_capacity(values)
    return values


def check_capacity(values: ClusterConfig) -> None:
    """The capacity settings EC2 Fleet would refuse, refused here with the line that fixes them."""
    overrides = len(values.factory_types) * len(values.subnet_ids)
    if overrides > MAX_OVERRIDES:
        raise StackConfigError(
            f"{NAMESPACE}:factoryTypes ({len(values.factory_types)}) times {NAMESPACE}:subnetIds "
            f"({len(values.subnet_ids)}) is {overrides} candidates, and EC2 Fleet takes at most {MAX_OVERRIDES}: "
            f"shorten a list, e.g. pulumi config rm --path '{NAMESPACE}:factoryTypes[{len(values.factory_types) - 1}]'")
    for key, items in (("factoryTypes", values.factory_types), ("orchestratorTypes", values.orchestrator_types),
                       ("subnetIds", values.subnet_ids)):
        twice = sorted({item for item in items if items.count(item) > 1})
        if twice:
            raise StackConfigError(f"{NAMESPACE}:{key} names {', '.join(twice)} twice: keep each once, e.g. "
                                   f"pulumi config rm --path '{NAMESPACE}:{key}[{len(items) - 1}]'")
    reservation = f"{NAMESPACE}:capacityReservationId"
    if values.capacity_reservation_id and values.capacity_reservation_group_arn:
        raise StackConfigError(
            f"{reservation} and {NAMESPACE}:capacityReservationGroupArn are both set; a launch targets one: "
            f"pulumi config rm {NAMESPACE}:capacityReservationGroupArn")
    if values.capacity_block and not values.capacity_reservation_id:
        raise StackConfigError(
            f"{NAMESPACE}:capacityBlock launches into a Capacity Block, which needs its reservation id: "
            f"pulumi config set {reservation} cr-0abc (aws ec2 describe-capacity-reservations lists yours)")
    reserved = values.capacity_reservation_id or values.capacity_reservation_group_arn
    if reserved and values.spot_mode != "off":
        raise StackConfigError(
            f"{NAMESPACE}:spot is {values.spot_mode}, but a capacity reservation holds on-demand capacity: "
            f"pulumi config set {NAMESPACE}:spot false")


def check_volume(values: ClusterConfig) -> None:
    if values.volume_type in PROVISIONED_IOPS_TYPES and values.volume_iops is None:
        raise StackConfigError(
            f"{NAMESPACE}:volumeType {values.volume_type} needs provisioned IOPS: "
            f"pulumi config set {NAMESPACE}:volumeIops 3000")


def check_placement(values: ClusterConfig) -> None:
    """The placement settings AWS would refuse at launch, refused here with the line that fixes them."""
    key = f"{NAMESPACE}:placementGroup"
    if values.efa and values.placement_group != "cluster":
        raise StackConfigError(
            f"{NAMESPACE}:efa needs the factories in a cluster placement group (EFA reaches only within one), but "
            f"{key} is {values.placement_group or 'unset'}: pulumi config set {key} cluster")
    if values.placement_group is None and values.placement_orchestrator:
        raise StackConfigError(
            f"{NAMESPACE}:placementOrchestrator puts the orchestrator in the placement group, but {key} is unset: "
            f"pulumi config set {key} cluster")
    if values.partition_count is not None and values.placement_group != "partition":
        raise StackConfigError(
            f"{NAMESPACE}:partitionCount applies to partition placement groups only, but {key} is "
            f"{values.placement_group or 'unset'}: pulumi config set {key} partition, or unset partitionCount")
    if (values.partition_count or 0) > MAX_PARTITIONS:
        raise StackConfigError(
            f"{NAMESPACE}:partitionCount is {values.partition_count}, but AWS allows at most {MAX_PARTITIONS} "
            f"partitions: pulumi config set {NAMESPACE}:partitionCount {MAX_PARTITIONS}")
    if values.placement_group == "spread" and values.dedicated:
        raise StackConfigError(
            f"{key} spread cannot hold Dedicated Instances (AWS refuses them): pulumi config set {key} partition, "
            f"or pulumi config set {NAMESPACE}:dedicated false")
    members = values.factory_count + (1 if values.placement_orchestrator else 0)
    if values.placement_group == "spread" and members > MAX_SPREAD_INSTANCES:
        raise StackConfigError(
            f"{key} spread holds at most {MAX_SPREAD_INSTANCES} running instances per Availability Zone, and this "
            f"cluster would put {members} in it: pulumi config set {key} partition")


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


class _Values:
    """Typed values of the stack's config: each missing or malformed one is a StackConfigError with its fix."""

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

    def _object(self, key: str) -> Any:
        try:
            return self.config.get_object(key)
        except Exception:
            raise self.fail(key, "is not valid JSON or YAML",
                            f"set lists with --path, e.g. pulumi config set --path '{NAMESPACE}:{key}[0]' VALUE") from None

    def _number(self, key: str) -> tuple[str | None, float | None]:
        """(the value as set, or None if unset; the number it is, or None if it is not one)."""
        value = self.config.get(key)
        if value is None or value == "":
            return None, None
        try:
            number = float(value)
        except ValueError:
            return value, None
        return value, (number if math.isfinite(number) else None)

    def preference_list(self, key: str, one_key: str, default: str | None) -> list[str]:
        """flambe:KEY (an ordered list) or its one-item shorthand flambe:ONE_KEY; both set is a contradiction."""
        many, one = self.optional_string_list(key), self.optional(one_key)
        if many is not None and one is not None:
            raise self.fail(key, f"and {NAMESPACE}:{one_key} are both set", f"keep the list: "
                            f"pulumi config rm {NAMESPACE}:{one_key}")
        if many is not None:
            return many
        if one is not None:
            return [one]
        if default is None:
            raise self.fail(key, "is required (your existing subnets, one per Availability Zone you allow)",
                            f"pulumi config set --path '{NAMESPACE}:{key}[0]' subnet-0abc")
        return [default]

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
        value, number = self._number(key)
        if value is None:
            return default
        if number is None or number != int(number) or number < minimum:
            raise self.fail(key, f"is {value!r}", f"give a whole number >= {minimum}")
        return int(number)

    def optional_integer(self, key: str, minimum: int) -> int | None:
        if self.config.get(key) in (None, ""):
            return None
        return self.integer(key, minimum, minimum)

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


class _Reader(_Values):
    """The stack's own settings: names, sizes, volumes, spot and tags, each checked as AWS will check it."""

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

    def hours(self, key: str) -> float | None:
        value, hours = self._number(key)
        if value is None:
            return None
        if hours is None or hours <= 0:
            raise self.fail(key, f"is {value!r}", "give a number of hours above 0, or leave it unset")
        if hours > MAX_IDLE_HOURS:
            raise self.fail(key, f"is {value!r}, beyond what CloudWatch can watch",
                            f"give at most {MAX_IDLE_HOURS} hours (7 days)")
        return hours

    def minutes(self, key: str) -> float | None:
        value, minutes = self._number(key)
        if value is None:
            return None
        if minutes is None or not 0 < minutes <= MAX_IDLE_HOURS * 60:
            raise self.fail(key, f"is {value!r}", f"give minutes above 0 and at most {MAX_IDLE_HOURS * 60}, e.g. "
                                                  f"pulumi config set {NAMESPACE}:{key} 30")
        return minutes

    def placement_strategy(self, key: str) -> str | None:
        value = self.optional(key)
        if value is None:
            return None
        if value not in PLACEMENT_STRATEGIES:
            raise self.fail(key, f"is {value!r}", f"use one of {', '.join(PLACEMENT_STRATEGIES)}, e.g. "
                                                  f"pulumi config set {NAMESPACE}:{key} cluster")
        return value

    def volume_type(self, key: str) -> str:
        value = self.optional(key) or ClusterConfig.volume_type
        if value in ("st1", "sc1"):
            raise self.fail(key, f"is {value!r}, which AWS cannot boot from",
                            f"use one of {', '.join(BOOT_VOLUME_TYPES)} for the root volume")
        return self.choice(key, BOOT_VOLUME_TYPES, ClusterConfig.volume_type)

    def percent(self, key: str, default: float) -> float:
        value, number = self._number(key)
        if value is None:
            return default
        if number is None or not 0 < number <= 100:
            raise self.fail(key, f"is {value!r}", "give a CPU percentage above 0 and at most 100")
        return number

    def spot_mode(self, key: str) -> str:
        value = (self.optional(key) or "false").lower()
        if value == "false":
            return "off"
        if value == "fallback":
            return "fallback"
        self.spot_price(key)  # true or a price; anything else is refused there
        return "spot"

    def spot_price(self, key: str) -> str | None:
        value = self.optional(key)
        if value is None or value.lower() in ("false", "true", "fallback"):
            return None
        try:
            if float(value) <= 0:
                raise ValueError
        except ValueError:
            raise self.fail(key, f"is {value!r}", "give true, false, fallback (spot, else on-demand), or a maximum "
                                                  "hourly price such as 0.25") from None
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
