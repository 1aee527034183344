"""The cluster's resources: one orchestrator and N factories in the user's subnet and security groups, an optional
placement group and EFA interfaces, optional idle alarms, and the stack outputs (contract v1). No security group,
rule, NACL, route or key pair.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws

from flambe_iac.aws.leftovers import LIVE_STATES
from flambe_iac.inputs.outputs import HOST_KEYS, contract_document
from flambe_iac.stacks.cluster_config import (
    AMAZON,
    CANONICAL,
    DEFAULT_AMI_NAME,
    DEFAULT_GPU_AMI_NAME,
    NAMESPACE,
    ClusterConfig,
    StackConfigError,
)
from flambe_iac.stacks.placement import check_placement_type, efa_interface_count, efa_launch_template, placement_group

ORCHESTRATOR, FACTORY = "orchestrator", "factory"
COMPONENT_TYPE = "flambe:cluster:Cluster"
SHORT_PERIOD, LONG_PERIOD = 300, 3600  # CloudWatch: periods under an hour may look back one day at most
ONE_DAY = 24 * 3600


class FlambeCluster(pulumi.ComponentResource):
    """One orchestrator and N factories with their idle alarms, as one component: `pulumi preview` shows them
    grouped, and its outputs are the contract v1 exports (plus the AMIs the instances run)."""

    def __init__(self, config: ClusterConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__(COMPONENT_TYPE, config.name, None, opts)
        check_network(config)
        child = pulumi.ResourceOptions(parent=self)
        kinds = {role: aws.ec2.get_instance_type(instance_type=instance_type_of(config, role))
                 for role in (ORCHESTRATOR, FACTORY)}
        placed = [FACTORY, ORCHESTRATOR] if config.placement_orchestrator else [FACTORY]
        for role in placed if config.placement_group else []:
            check_placement_type(config, f"{role}Type", instance_type_of(config, role), kinds[role])
        efa_interfaces = efa_interface_count(config, config.factory_type, kinds[FACTORY])
        self.amis = {role: choose_ami(config, role, kinds[role]) for role in (ORCHESTRATOR, FACTORY)}
        self.placement_group = placement_group(config, tags_for(config, "placement", f"{config.name}_placement"),
                                               child) if config.placement_group else None
        self.efa_template = efa_launch_template(config, efa_interfaces, tags_for(config, FACTORY, f"{config.name}_efa"),
                                                child) if efa_interfaces else None
        group = {role: self.placement_group if role in placed else None for role in (ORCHESTRATOR, FACTORY)}
        self.orchestrator = instance(config, ORCHESTRATOR, f"{config.name}_orchestrator", self.amis[ORCHESTRATOR],
                                     child, group[ORCHESTRATOR])
        self.factories = [instance(config, FACTORY, f"{config.name}_factory_{index}", self.amis[FACTORY], child,
                                   group[FACTORY], self.efa_template)
                          for index in range(config.factory_count)]
        region = aws.get_region_output().region
        self.alarms = []
        if config.orchestrator_idle_hours is not None:
            self.alarms.append(idle_alarm(config, self.orchestrator, ORCHESTRATOR, f"{config.name}_orchestrator",
                                          config.orchestrator_idle_hours, region, child))
        if config.factories_idle_hours is not None:
            self.alarms += [idle_alarm(config, factory, FACTORY, f"{config.name}_factory_{index}",
                                       config.factories_idle_hours, region, child)
                            for index, factory in enumerate(self.factories)]
        self.exports = {
            **contract_document(config.name, config.username, region, host_entry(self.orchestrator),
                                [host_entry(factory) for factory in self.factories], config.autostop_minutes),
            "amis": dict(self.amis),
        }
        self.register_outputs(self.exports)


def declare_cluster(config: ClusterConfig) -> dict[str, Any]:
    """Declare every resource and return the exports, key by key as contract v1 names them."""
    return FlambeCluster(config).exports


def check_network(config: ClusterConfig) -> None:
    """Read-only: the subnet and every security group exist and share one VPC, or the stack stops with why."""
    subnet = aws.ec2.get_subnet(id=config.subnet_id)
    for group_id in config.security_group_ids:
        group = aws.ec2.get_security_group(id=group_id)
        if group.vpc_id != subnet.vpc_id:
            raise StackConfigError(
                f"flambe:securityGroupIds has {group_id}, which is in {group.vpc_id}, but flambe:subnetId "
                f"{config.subnet_id} is in {subnet.vpc_id}: give security groups of the subnet's VPC"
            )


def instance_type_of(config: ClusterConfig, role: str) -> str:
    return config.orchestrator_type if role == ORCHESTRATOR else config.factory_type


def choose_ami(config: ClusterConfig, role: str, kind) -> str:
    """The image for ROLE's instances: given; else the one the cluster's instances of that role already run (so a
    factory added later boots what the others run, unless refreshAmi); else the newest for the instance type:
    Ubuntu 24.04 LTS for its architecture, or for a factory type with GPUs, AWS's Deep Learning Base GPU AMI.
    A given image whose architecture the instance type cannot run is refused here, at preview. KIND: what
    getInstanceType says of the role's type."""
    instance_type = instance_type_of(config, role)
    architecture = "arm64" if "arm64" in kind.supported_architectures else "x86_64"
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


def instance(config: ClusterConfig, role: str, name: str, ami: str, opts: pulumi.ResourceOptions,
             group: aws.ec2.PlacementGroup | None = None, efa_template: aws.ec2.LaunchTemplate | None = None
             ) -> aws.ec2.Instance:
    """With EFA_TEMPLATE, the subnet, security groups and public address are its interfaces' (EC2 refuses both)."""
    tags = tags_for(config, role, name)
    spot = config.spot_max_price is not None and role == FACTORY
    network = dict(subnet_id=config.subnet_id, vpc_security_group_ids=config.security_group_ids,
                   associate_public_ip_address=config.associate_public_ip) if efa_template is None else dict(
        launch_template=aws.ec2.InstanceLaunchTemplateArgs(id=efa_template.id,
                                                           version=efa_template.latest_version.apply(str)))
    return aws.ec2.Instance(
        name,
        ami=ami,
        instance_type=instance_type_of(config, role),
        **network,
        placement_group=group.name if group is not None else None,
        key_name=config.key_name,
        # With autostopMinutes, what the agent's `shutdown` does: idleAction (a one-time spot request can only
        # terminate). Without it, EC2's default (stop): a shutdown typed on the host never deletes its volume.
        instance_initiated_shutdown_behavior=("terminate" if spot else config.idle_action)
        if config.autostop_minutes is not None else None,
        iam_instance_profile=config.iam_instance_profile,
        tenancy="dedicated" if config.dedicated else None,
        instance_market_options=aws.ec2.InstanceInstanceMarketOptionsArgs(
            market_type="spot",
            spot_options=aws.ec2.InstanceInstanceMarketOptionsSpotOptionsArgs(
                max_price=config.spot_max_price or None,
                spot_instance_type="one-time",
                instance_interruption_behavior="terminate",
            ),
        ) if spot else None,
        # IMDSv2 only: a server-side request forgery on the host cannot read the instance role's credentials.
        metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_endpoint="enabled", http_tokens="required"),
        # Encrypted: the root volume holds secret.ini and the cluster key.
        root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
            volume_size=config.volume_size, volume_type=config.volume_type, iops=config.volume_iops,
            encrypted=True, kms_key_id=config.kms_key_id, tags=tags),
        tags=tags,
        # A new AMI release must not replace running instances.
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(ignore_changes=["ami"])),
    )


def alarm_periods(hours: float) -> tuple[int, int]:
    """(period seconds, evaluation periods) that AWS accepts for HOURS: 5-minute periods up to a day, hour-long
    periods beyond (up to the 7 days config allows)."""
    if hours * 3600 <= ONE_DAY:
        return SHORT_PERIOD, max(1, round(hours * 3600 / SHORT_PERIOD))
    return LONG_PERIOD, round(hours)


def idle_alarm(config: ClusterConfig, target: aws.ec2.Instance, role: str, name: str, hours: float,
               region: pulumi.Output[str], opts: pulumi.ResourceOptions) -> aws.cloudwatch.MetricAlarm:
    """Stop or terminate an instance whose average CPU stays under its role's threshold for HOURS."""
    period, periods = alarm_periods(hours)
    threshold = config.orchestrator_idle_cpu if role == ORCHESTRATOR else config.factories_idle_cpu
    return aws.cloudwatch.MetricAlarm(
        f"{name}_idle",
        alarm_description=f"flambe: {config.idle_action} {name} after {hours:g} hours under {threshold:g}% CPU",
        namespace="AWS/EC2",
        metric_name="CPUUtilization",
        statistic="Average",
        dimensions={"InstanceId": target.id},
        period=period,
        evaluation_periods=periods,
        datapoints_to_alarm=periods,
        threshold=threshold,
        comparison_operator="LessThanThreshold",
        # The action's ARN names the region the provider really deploys to.
        alarm_actions=[region.apply(lambda name: f"arn:aws:automate:{name}:ec2:{config.idle_action}")],
        tags=tags_for(config, role, name),
        opts=opts,
    )


def host_entry(target: aws.ec2.Instance) -> dict[str, Any]:
    """A host as contract v1 has it; an instance without a public address exports null, not ""."""
    entry = {key: getattr(target, key) for key in HOST_KEYS}
    for key in ("public_ip", "public_dns"):
        entry[key] = entry[key].apply(lambda text: text or None)
    return entry
