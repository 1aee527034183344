"""The cluster's resources: one orchestrator and N factories in the user's subnet and security groups,
optional idle alarms, and the stack outputs (contract v1). No security group, rule, NACL, route or key pair.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws

from flambe_iac.outputs import HOST_KEYS, contract_document
from flambe_iac.stacks.cluster_config import ClusterConfig, StackConfigError

ORCHESTRATOR, FACTORY = "orchestrator", "factory"
IDLE_CPU_PERCENT = 5.0
IDLE_PERIOD_SECONDS = 300


def declare_cluster(config: ClusterConfig) -> dict[str, Any]:
    """Declare every resource and return the exports, key by key as contract v1 names them."""
    check_network(config)
    ami = config.ami or newest_ami(config)
    orchestrator = instance(config, ORCHESTRATOR, f"{config.name}_orchestrator", ami)
    factories = [instance(config, FACTORY, f"{config.name}_factory_{index}", ami)
                 for index in range(config.factory_count)]
    region = aws.get_region_output().region
    if config.orchestrator_idle_hours is not None:
        idle_alarm(config, orchestrator, ORCHESTRATOR, f"{config.name}_orchestrator", config.orchestrator_idle_hours,
                   region)
    if config.factories_idle_hours is not None:
        for index, factory in enumerate(factories):
            idle_alarm(config, factory, FACTORY, f"{config.name}_factory_{index}", config.factories_idle_hours, region)
    return contract_document(config.name, config.username, region, host_entry(orchestrator),
                             [host_entry(factory) for factory in factories])


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


def newest_ami(config: ClusterConfig) -> str:
    image = aws.ec2.get_ami(
        most_recent=True,
        owners=config.ami_owners,
        filters=[aws.ec2.GetAmiFilterArgs(name="name", values=[config.ami_name]),
                 aws.ec2.GetAmiFilterArgs(name="state", values=["available"])],
    )
    return image.id


def tags_for(config: ClusterConfig, role: str, name: str) -> dict[str, str]:
    """The user's tags, then ours: the five reserved tags always say what flambe-iac set."""
    return {**config.tags, "creator": config.creator, "Purpose": "flambe", "Cluster-Name": config.name,
            "Role": role, "Name": name}


def instance(config: ClusterConfig, role: str, name: str, ami: str) -> aws.ec2.Instance:
    tags = tags_for(config, role, name)
    spot = config.spot_max_price is not None and role == FACTORY
    return aws.ec2.Instance(
        name,
        ami=ami,
        instance_type=config.orchestrator_type if role == ORCHESTRATOR else config.factory_type,
        subnet_id=config.subnet_id,
        vpc_security_group_ids=config.security_group_ids,
        key_name=config.key_name,
        associate_public_ip_address=config.associate_public_ip,
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
        root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
            volume_size=config.volume_size, volume_type=config.volume_type, tags=tags),
        tags=tags,
        # A new AMI release must not replace running instances.
        opts=pulumi.ResourceOptions(ignore_changes=["ami"]),
    )


def idle_alarm(config: ClusterConfig, target: aws.ec2.Instance, role: str, name: str, hours: float,
               region: pulumi.Output[str]) -> aws.cloudwatch.MetricAlarm:
    """Terminate an instance whose CPU stays under IDLE_CPU_PERCENT for HOURS (Flambé's idle timeout)."""
    periods = max(1, round(hours * 3600 / IDLE_PERIOD_SECONDS))
    return aws.cloudwatch.MetricAlarm(
        f"{name}_idle",
        alarm_description=f"flambe: terminate {name} after {hours:g} idle hours",
        namespace="AWS/EC2",
        metric_name="CPUUtilization",
        statistic="Average",
        dimensions={"InstanceId": target.id},
        period=IDLE_PERIOD_SECONDS,
        evaluation_periods=periods,
        datapoints_to_alarm=periods,
        threshold=IDLE_CPU_PERCENT,
        comparison_operator="LessThanThreshold",
        # The terminate action's ARN names the region the provider really deploys to.
        alarm_actions=[region.apply(lambda name: f"arn:aws:automate:{name}:ec2:terminate")],
        tags=tags_for(config, role, name),
    )


def host_entry(target: aws.ec2.Instance) -> dict[str, Any]:
    """A host as contract v1 has it; an instance without a public address exports null, not ""."""
    entry = {key: getattr(target, key) for key in HOST_KEYS}
    for key in ("public_ip", "public_dns"):
        entry[key] = entry[key].apply(lambda text: text or None)
    return entry
