"""The cluster's resources: one orchestrator and N factories, each role an EC2 Fleet of type instant over its ordered
instance types x the user's subnets (all in one zone and one type, or none), in the user's security groups; an
optional placement group and EFA interfaces, optional idle alarms, and the stack outputs (contract v1, each host
with its type, zone and market). No security group, rule, NACL, route or key pair.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws

from flambe_iac.aws.leftovers import LIVE_STATES
from flambe_iac.inputs.outputs import contract_document
from flambe_iac.aws.fleets import capacity_reservation
from flambe_iac.stacks.capacity import (
    CAPACITY_BLOCK,
    ON_DEMAND,
    SPOT,
    Candidate,
    candidates,
    check_same_account,
    ec2_reader,
    fleet,
    launched,
    live_instances,
)
from flambe_iac.stacks.cluster_config import (
    AMAZON,
    CANONICAL,
    DEFAULT_AMI_NAME,
    DEFAULT_GPU_AMI_NAME,
    NAMESPACE,
    ClusterConfig,
    StackConfigError,
)
from flambe_iac.stacks.launches import (
    ATTEMPT_TAG,
    FLEET_TAG,
    LAUNCH_TAG,
    STACK_TAG,
    fleet_name,
    held_attempt,
    history,
    new_attempt,
    plan,
    stack_identity,
)
from flambe_iac.stacks.placement import (
    check_placement_type,
    efa_interface_count,
    efa_network_interfaces,
    placement_group,
)

ORCHESTRATOR, FACTORY = "orchestrator", "factory"
COMPONENT_TYPE = "flambe:cluster:Cluster"
SHORT_PERIOD, LONG_PERIOD = 300, 3600  # CloudWatch: periods under an hour may look back one day at most
ONE_DAY = 24 * 3600
TYPE_KEYS = {ORCHESTRATOR: "orchestratorType", FACTORY: "factoryType"}


class FlambeCluster(pulumi.ComponentResource):
    """One orchestrator and N factories with their idle alarms, as one component: `pulumi preview` shows them
    grouped, and its outputs are the contract v1 exports (plus the AMIs the instances run)."""

    def __init__(self, config: ClusterConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__(COMPONENT_TYPE, config.name, None, opts)
        zones = check_network(config)
        child = pulumi.ResourceOptions(parent=self)
        kinds = {kind: aws.ec2.get_instance_type(instance_type=kind)
                 for kind in dict.fromkeys(config.factory_types + config.orchestrator_types)}
        placed = [FACTORY, ORCHESTRATOR] if config.placement_orchestrator else [FACTORY]
        for role in placed if config.placement_group else []:
            for kind in types_of(config, role):
                check_placement_type(config, TYPE_KEYS[role], kind, kinds[kind])
        for role in (ORCHESTRATOR, FACTORY):
            check_one_architecture(config, role, kinds)
        efa_interfaces = efa_interface_count(config, config.factory_types, kinds)
        region = aws.get_region().region
        check_same_account(region)
        check_reservation(config, zones, region)
        self.amis = {role: choose_ami(config, role, kinds[types_of(config, role)[0]])
                     for role in (ORCHESTRATOR, FACTORY)}
        self.placement_group = placement_group(config, tags_for(config, "placement", f"{config.name}_placement"),
                                               child) if config.placement_group else None
        self.group = {role: self.placement_group if role in placed else None for role in (ORCHESTRATOR, FACTORY)}
        self.efa_interfaces = efa_interfaces
        self.templates: dict[str, aws.ec2.LaunchTemplate] = {}  # by fleet name
        factory_choices = candidates(config.factory_types, config.subnet_ids, zones)
        self.factories = self.launch_factories(config, factory_choices, region, child) if config.factory_count else []
        orchestrator_choices = orchestrator_candidates(config, zones, self.factories)
        orchestrator_name = f"{config.name}_orchestrator"
        attempt = held_attempt(live_instances(region, config.name, ORCHESTRATOR), config.name, ORCHESTRATOR,
                               stack_identity())
        self.orchestrator_fleet = fleet(orchestrator_name, 1, ON_DEMAND,
                                        self.template(config, ORCHESTRATOR, orchestrator_name, None, attempt, child),
                                        orchestrator_choices, config,
                                        tags_for(config, ORCHESTRATOR, orchestrator_name), attempt, child)
        self.orchestrator = member(
            launched(self.orchestrator_fleet, attempt, 1, orchestrator_choices, "orchestrator", region),
            0, config, orchestrator=True)
        self.alarms = []
        if config.orchestrator_idle_hours is not None:
            self.alarms.append(idle_alarm(config, self.orchestrator["id"], ORCHESTRATOR,
                                          f"{config.name}_orchestrator", config.orchestrator_idle_hours, region, child))
        if config.factories_idle_hours is not None:
            self.alarms += [idle_alarm(config, factory["id"], FACTORY, f"{config.name}_factory_{index}",
                                       config.factories_idle_hours, region, child)
                            for index, factory in enumerate(self.factories)]
        self.exports = {
            **contract_document(config.name, config.username, region, self.orchestrator, self.factories,
                                config.autostop_minutes),
            "amis": dict(self.amis),
        }
        self.register_outputs(self.exports)


    def launch_factories(self, config: ClusterConfig, choices: list[Candidate], region: str,
                         opts: pulumi.ResourceOptions) -> list[dict[str, Any]]:
        """The factories, launch by launch: those that run stay as they are; what is missing is one new launch,
        pinned to the type, zone and market of the cluster's first launch, or, for a new cluster, over every
        candidate (spot fallback: spot first, on-demand for all only when spot launched none)."""
        launches = history(live_instances(region, config.name, FACTORY), config.name, stack_identity())
        step = plan(config.factory_count, launches)
        hosts = []
        for launch in step.kept:
            for name, held in launch.fleets.items():
                first = held[0]
                fleet(name, len(held), SPOT if first[4] == SPOT else ON_DEMAND,
                      self.template(config, FACTORY, name, launch.index, launch.attempt, opts),
                      [Candidate(first[1], first[2], first[3])], config, self.launch_tags(config, launch.index, name),
                      launch.attempt, opts)
                members = pulumi.Output.from_input([(item[0], item[1], item[4]) for item in held])
                hosts += [member(members, index, config) for index in range(len(held))]
        if step.new_index is None:
            return hosts
        name = fleet_name(config.name, step.new_index)
        if step.kept:  # more of what the cluster has: its type, its zone, its market
            first = step.kept[0].live[0]
            choices, market, fallback = [Candidate(first[1], first[2], first[3])], first[4], False
        else:
            market, fallback = (ON_DEMAND if config.spot_mode == "off" else SPOT), config.spot_mode == "fallback"
        members = self.launch(config, name, step, choices, market, fallback, region, opts)
        return hosts + [member(members, index, config) for index in range(step.new_count)]

    def launch(self, config: ClusterConfig, name: str, step, choices: list[Candidate], market: str, fallback: bool,
               region: str, opts: pulumi.ResourceOptions) -> pulumi.Output:
        count, what = step.new_count, "factories" if not step.kept else "more factories in the cluster's type and zone"
        attempt = new_attempt()
        self.new_fleet = fleet(name, count, market, self.template(config, FACTORY, name, step.new_index, attempt, opts),
                               choices, config, self.launch_tags(config, step.new_index, name), attempt, opts)
        if not fallback:
            return launched(self.new_fleet, attempt, count, choices, what, region, market)

        def on_demand(tried_with_spot):
            fallback_name = fleet_name(config.name, step.new_index, on_demand=True)
            self.fallback_fleet = fleet(fallback_name, count, ON_DEMAND,
                                        self.template(config, FACTORY, fallback_name, step.new_index, attempt, opts),
                                        choices, config, self.launch_tags(config, step.new_index, fallback_name),
                                        attempt, opts)
            return launched(self.fallback_fleet, attempt, count, choices, what, region, ON_DEMAND,
                            earlier=tried_with_spot)
        return launched(self.new_fleet, attempt, count, choices, what, region, SPOT, otherwise=on_demand)

    def template(self, config: ClusterConfig, role: str, name: str, index: int | None, attempt: str,
                 opts: pulumi.ResourceOptions) -> aws.ec2.LaunchTemplate:
        """The launch template of fleet NAME: the role's, plus the tags by which the next run finds the fleet from
        its instances (DescribeFleets lists no instant fleet unless asked by id). Named as the fleet, in the
        singular: exp1_factory for exp1_factories, exp1_factory_1 for exp1_factories_1."""
        marks = {FLEET_TAG: name, ATTEMPT_TAG: attempt, STACK_TAG: stack_identity(),
                 **({LAUNCH_TAG: str(index)} if index is not None else {})}
        template_name = name if role == ORCHESTRATOR else \
            f"{config.name}_factory" + name[len(f"{config.name}_factories"):]
        self.templates[name] = launch_template(config, role, self.amis[role], self.group[role],
                                               self.efa_interfaces if role == FACTORY else 0, opts,
                                               template_name, marks)
        return self.templates[name]

    @staticmethod
    def launch_tags(config: ClusterConfig, index: int, name: str) -> dict[str, str]:
        return {**tags_for(config, FACTORY, f"{config.name}_factory"), LAUNCH_TAG: str(index), FLEET_TAG: name}


def declare_cluster(config: ClusterConfig) -> dict[str, Any]:
    """Declare every resource and return the exports, key by key as contract v1 names them."""
    return FlambeCluster(config).exports


def check_network(config: ClusterConfig) -> dict[str, str]:
    """Read-only: every subnet exists, all in the first one's VPC and each in its own zone, and every security group
    is of that VPC; or the stack stops with why and the fixing line. Returns {subnet id: its zone}."""
    subnets = {subnet_id: aws.ec2.get_subnet(id=subnet_id) for subnet_id in config.subnet_ids}
    first = subnets[config.subnet_ids[0]]
    zones: dict[str, str] = {}
    for position, (subnet_id, subnet) in enumerate(subnets.items()):
        fix = f"pulumi config rm --path '{NAMESPACE}:subnetIds[{position}]'"
        if subnet.vpc_id != first.vpc_id:
            raise StackConfigError(
                f"{NAMESPACE}:subnetIds has {subnet_id}, which is in {subnet.vpc_id}, but the first, "
                f"{config.subnet_ids[0]}, is in {first.vpc_id}: the security groups hold in one VPC only. "
                f"Give subnets of {first.vpc_id}: {fix}")
        twin = next((other for other, zone in zones.items() if zone == subnet.availability_zone), None)
        if twin is not None:
            raise StackConfigError(
                f"{NAMESPACE}:subnetIds has {twin} and {subnet_id}, both in {subnet.availability_zone}: give one "
                f"subnet per Availability Zone (EC2 Fleet picks a zone, not a subnet): {fix}")
        zones[subnet_id] = subnet.availability_zone
    for group_id in config.security_group_ids:
        group = aws.ec2.get_security_group(id=group_id)
        if group.vpc_id != first.vpc_id:
            raise StackConfigError(
                f"{NAMESPACE}:securityGroupIds has {group_id}, which is in {group.vpc_id}, but {NAMESPACE}:subnetIds "
                f"{config.subnet_ids[0]} is in {first.vpc_id}: give security groups of the subnets' VPC"
            )
    return zones


def check_one_architecture(config: ClusterConfig, role: str, kinds: dict) -> None:
    """One image boots every type a role lists, so they share one architecture."""
    architectures = {kind: architecture_of(kinds[kind]) for kind in types_of(config, role)}
    if len(set(architectures.values())) > 1:
        listed = ", ".join(f"{kind} ({architecture})" for kind, architecture in architectures.items())
        key = TYPE_KEYS[role] + "s"
        raise StackConfigError(
            f"{NAMESPACE}:{key} mixes architectures ({listed}), and one image cannot boot both: list types of one "
            f"architecture, e.g. pulumi config rm --path '{NAMESPACE}:{key}[{len(architectures) - 1}]'")


def check_reservation(config: ClusterConfig, zones: dict[str, str], region: str) -> None:
    """A capacity reservation whose type or zone is not in the lists would never be used: refused at preview."""
    if not config.capacity_reservation_id:
        return
    found = capacity_reservation(ec2_reader(region), config.capacity_reservation_id)
    key = f"{NAMESPACE}:capacityReservationId {config.capacity_reservation_id}"
    if found is None:
        raise StackConfigError(f"{key} does not exist in {region}: aws ec2 describe-capacity-reservations "
                               f"--region {region} lists yours")
    reserved_type, reserved_zone = found.get("InstanceType"), found.get("AvailabilityZone")
    if reserved_type not in config.factory_types:
        raise StackConfigError(
            f"{key} holds {reserved_type}, which {NAMESPACE}:factoryTypes does not list: "
            f"pulumi config set --path '{NAMESPACE}:factoryTypes[0]' {reserved_type}")
    if reserved_zone not in zones.values():
        raise StackConfigError(
            f"{key} is in {reserved_zone}, and no subnet of {NAMESPACE}:subnetIds is: add one of that zone, "
            f"pulumi config set --path '{NAMESPACE}:subnetIds[{len(zones)}]' subnet-0abc")


def orchestrator_candidates(config: ClusterConfig, zones: dict[str, str], factories: list[dict]) -> Any:
    """The orchestrator goes where the factories went: its types in the subnet of the factories' zone (with no
    factory: in every subnet, in order)."""
    if not factories:
        return candidates(config.orchestrator_types, config.subnet_ids, zones)
    return factories[0]["availability_zone"].apply(lambda zone: candidates(
        config.orchestrator_types, [subnet for subnet in config.subnet_ids if zones[subnet] == zone], zones))


def member(members: pulumi.Output, index: int, config: ClusterConfig, orchestrator: bool = False) -> dict[str, Any]:
    """A host as contract v1 has it, from what its fleet launched: addresses read with getInstance (null, not "",
    without a public address), and where it landed."""
    instance_id = members.apply(lambda items: items[index][0])
    found = aws.ec2.get_instance_output(instance_id=instance_id)
    lifecycle = members.apply(lambda items: items[index][2])
    return {
        "id": instance_id,
        "public_ip": found.public_ip.apply(lambda text: text or None),
        "private_ip": found.private_ip,
        "public_dns": found.public_dns.apply(lambda text: text or None),
        "instance_type": members.apply(lambda items: items[index][1]),
        "availability_zone": found.availability_zone,
        "market": lifecycle.apply(lambda value: market_of(config, value, orchestrator)),
    }


def market_of(config: ClusterConfig, lifecycle: str | None, orchestrator: bool) -> str:
    if config.capacity_block and not orchestrator:
        return CAPACITY_BLOCK
    return SPOT if lifecycle == SPOT else ON_DEMAND


def types_of(config: ClusterConfig, role: str) -> list[str]:
    return config.orchestrator_types if role == ORCHESTRATOR else config.factory_types


def architecture_of(kind) -> str:
    return "arm64" if "arm64" in kind.supported_architectures else "x86_64"


def choose_ami(config: ClusterConfig, role: str, kind) -> str:
    """The image for ROLE's instances: given; else the one the cluster's instances of that role already run (so a
    factory added later boots what the others run, unless refreshAmi); else the newest for the instance type:
    Ubuntu 24.04 LTS for its architecture, or for a factory type with GPUs, AWS's Deep Learning Base GPU AMI.
    A given image whose architecture the instance type cannot run is refused here, at preview. KIND: what
    getInstanceType says of the role's first type (all of its types share one architecture)."""
    instance_type = types_of(config, role)[0]
    architecture = architecture_of(kind)
    given = config.factory_ami if role == FACTORY and config.factory_ami else config.ami
    if given:
        check_architecture(given, architecture, instance_type)
        return given
    running = None if config.refresh_ami else ami_in_use(config, role)
    if running:
        return running
    name, owners = ami_search(config, role, architecture, gpus=bool(kind.gpuses))
    image = aws.ec2.get_ami(
        most_recent=True,
        owners=owners,
        filters=[aws.ec2.GetAmiFilterArgs(name="name", values=[name]),
                 aws.ec2.GetAmiFilterArgs(name="architecture", values=[architecture]),
                 aws.ec2.GetAmiFilterArgs(name="state", values=["available"])],
    )
    return image.id


def ami_search(config: ClusterConfig, role: str, architecture: str, gpus: bool) -> tuple[str, list[str]]:
    """(name pattern, owners) to look the newest image up by."""
    if role == FACTORY and config.factory_ami_name:
        return config.factory_ami_name, config.factory_ami_owners or config.ami_owners
    if role == FACTORY and gpus and not config.ami_name:
        return DEFAULT_GPU_AMI_NAME.format(arm="ARM64 " if architecture == "arm64" else ""), [AMAZON]
    if config.ami_name:
        return config.ami_name, config.ami_owners
    return DEFAULT_AMI_NAME.format(arch="arm64" if architecture == "arm64" else "amd64"), [CANONICAL]


def ami_in_use(config: ClusterConfig, role: str) -> str | None:
    """The image this cluster's instances of ROLE run now, if any (read-only)."""
    found = aws.ec2.get_instances(instance_tags={"Cluster-Name": config.name, "Role": role, "Purpose": "flambe"},
                                  instance_state_names=list(LIVE_STATES))
    if not found.ids:
        return None
    return aws.ec2.get_instance(instance_id=sorted(found.ids)[0]).ami


def check_architecture(ami: str, architecture: str, instance_type: str) -> None:
    image = aws.ec2.get_ami(filters=[aws.ec2.GetAmiFilterArgs(name="image-id", values=[ami])])
    if image.architecture != architecture:
        raise StackConfigError(
            f"{NAMESPACE}:ami {ami} is built for {image.architecture}, but {instance_type} runs {architecture}: "
            f"give an {architecture} image, or unset it to have one chosen for the type")


def tags_for(config: ClusterConfig, role: str, name: str) -> dict[str, str]:
    """The user's tags, then ours: the five reserved tags always say what flambe-iac set."""
    return {**config.tags, "creator": config.creator, "Purpose": "flambe", "Cluster-Name": config.name,
            "Role": role, "Name": name}


def launch_template(config: ClusterConfig, role: str, ami: str, group: aws.ec2.PlacementGroup | None,
                    efa_interfaces: int, opts: pulumi.ResourceOptions, name: str,
                    marks: dict[str, str]) -> aws.ec2.LaunchTemplate:
    """What each of ROLE's instances carries, whatever type and subnet its fleet picks (the fleet's override sets
    those): image, key, encrypted root volume, IMDSv2 only, profile, shutdown behaviour, tags, security groups
    (on the interfaces: EC2 refuses both), EFA interfaces, placement and a capacity reservation. MARKS: tags on the
    instances only, which name their launch, fleet and attempt."""
    tags = tags_for(config, role, f"{config.name}_{role}")
    factory = role == FACTORY
    spot = factory and config.spot_mode != "off"
    reservation = factory and (config.capacity_reservation_id or config.capacity_reservation_group_arn)
    return aws.ec2.LaunchTemplate(
        name,
        image_id=ami,
        key_name=config.key_name,
        network_interfaces=network_interfaces(config, efa_interfaces),
        # With autostopMinutes, what the agent's `shutdown` does: idleAction (a spot instance can only
        # terminate). Without it, EC2's default (stop): a shutdown typed on the host never deletes its volume.
        instance_initiated_shutdown_behavior=("terminate" if spot else config.idle_action)
        if config.autostop_minutes is not None else None,
        iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(name=config.iam_instance_profile)
        if config.iam_instance_profile else None,
        placement=aws.ec2.LaunchTemplatePlacementArgs(
            tenancy="dedicated" if config.dedicated else None,
            group_name=group.name if group is not None else None,
        ) if config.dedicated or group is not None else None,
        instance_market_options=aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(market_type="capacity-block")
        if factory and config.capacity_block else None,
        capacity_reservation_specification=reservation_specification(config) if reservation else None,
        # IMDSv2 only: a server-side request forgery on the host cannot read the instance role's credentials.
        metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(http_endpoint="enabled", http_tokens="required"),
        # Encrypted: the root volume holds secret.ini and the cluster key.
        block_device_mappings=[aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
            device_name=root_device(ami),
            ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                volume_size=config.volume_size, volume_type=config.volume_type, iops=config.volume_iops,
                encrypted="true", kms_key_id=config.kms_key_id, delete_on_termination="true"))],
        tag_specifications=[
            aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type="instance", tags={**tags, **marks}),
            aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type="volume", tags=tags)],
        tags=tags,
        # A new AMI release must not replace running instances (nor would it: a fleet ignores its template's
        # later versions).
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(ignore_changes=["imageId"])),
    )


def reservation_specification(config: ClusterConfig) -> aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs:
    target = aws.ec2.LaunchTemplateCapacityReservationSpecificationCapacityReservationTargetArgs
    return aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs(capacity_reservation_target=target(
        capacity_reservation_id=config.capacity_reservation_id,
        capacity_reservation_resource_group_arn=config.capacity_reservation_group_arn))


def network_interfaces(config: ClusterConfig, efa_interfaces: int) -> list:
    """The primary interface (or every EFA interface) in the user's security groups; the subnet is the fleet's
    override."""
    if efa_interfaces:
        return efa_network_interfaces(config, efa_interfaces)
    return [aws.ec2.LaunchTemplateNetworkInterfaceArgs(
        device_index=0, security_groups=config.security_group_ids, delete_on_termination="true",
        associate_public_ip_address="true" if config.associate_public_ip else "false")]


def root_device(ami: str) -> str:
    """The image's root device name, which the root volume's mapping must name."""
    image = aws.ec2.get_ami(filters=[aws.ec2.GetAmiFilterArgs(name="image-id", values=[ami])])
    return getattr(image, "root_device_name", None) or "/dev/sda1"


def alarm_periods(hours: float) -> tuple[int, int]:
    """(period seconds, evaluation periods) that AWS accepts for HOURS: 5-minute periods up to a day, hour-long
    periods beyond (up to the 7 days config allows)."""
    if hours * 3600 <= ONE_DAY:
        return SHORT_PERIOD, max(1, round(hours * 3600 / SHORT_PERIOD))
    return LONG_PERIOD, round(hours)


def idle_alarm(config: ClusterConfig, instance_id: pulumi.Output[str], role: str, name: str, hours: float,
               region: str, opts: pulumi.ResourceOptions) -> aws.cloudwatch.MetricAlarm:
    """Stop or terminate an instance whose average CPU stays under its role's threshold for HOURS."""
    period, periods = alarm_periods(hours)
    threshold = config.orchestrator_idle_cpu if role == ORCHESTRATOR else config.factories_idle_cpu
    return aws.cloudwatch.MetricAlarm(
        f"{name}_idle",
        alarm_description=f"flambe: {config.idle_action} {name} after {hours:g} hours under {threshold:g}% CPU",
        namespace="AWS/EC2",
        metric_name="CPUUtilization",
        statistic="Average",
        dimensions={"InstanceId": instance_id},
        period=period,
        evaluation_periods=periods,
        datapoints_to_alarm=periods,
        threshold=threshold,
        comparison_operator="LessThanThreshold",
        # The action's ARN names the region the provider really deploys to.
        alarm_actions=[f"arn:aws:automate:{region}:ec2:{config.idle_action}"],
        tags=tags_for(config, role, name),
        opts=opts,
    )
