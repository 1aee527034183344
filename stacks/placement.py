"""Where the factories sit and how they reach each other: one placement group per cluster, and EFA interfaces.

Neither is a firewall resource: the placement group says which racks, and the EFA interfaces go in the user's subnet
with the user's security groups. What an instance type cannot do is refused here, at preview, with the fixing line.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from flambe_iac.stacks.cluster_config import NAMESPACE, ClusterConfig, StackConfigError

# Types with EFA, named when a type without it is refused (tests check each against EC2's catalogue).
EFA_TYPE_EXAMPLES = ("p5.48xlarge", "p4d.24xlarge", "g6.8xlarge", "g5.48xlarge", "c5n.18xlarge")


def check_placement_type(config: ClusterConfig, type_key: str, instance_type: str, kind) -> None:
    """KIND (getInstanceType's answer for INSTANCE_TYPE, the value of TYPE_KEY) can join the placement group."""
    strategies = kind.supported_placement_strategies or []
    if config.placement_group and config.placement_group not in strategies:
        can = ", ".join(strategies) or "none"
        other = "" if config.efa or not strategies else \
            f", or pulumi config set {NAMESPACE}:placementGroup {strategies[0]}"
        raise StackConfigError(
            f"{NAMESPACE}:placementGroup is {config.placement_group}, but {instance_type} cannot join a "
            f"{config.placement_group} placement group (it supports: {can}): pick a type that can, e.g. "
            f"pulumi config set {NAMESPACE}:{type_key} c5n.18xlarge{other}")


def efa_interface_count(config: ClusterConfig, instance_types: list[str], kinds: dict) -> int:
    """How many EFA interfaces each factory gets (0 without flambe:efa): every listed type must have EFA, and the
    same number of interfaces (one launch template serves them all); a public address on more than one interface
    is refused, as EC2 cannot give one at launch. KINDS: getInstanceType's answer for each type."""
    if not config.efa:
        return 0
    counts = {}
    for instance_type in instance_types:
        kind = kinds[instance_type]
        if not kind.efa_supported:
            raise StackConfigError(
                f"{NAMESPACE}:efa is true, but {instance_type} has no EFA: use a type that has it, e.g. "
                f"pulumi config set {NAMESPACE}:factoryType {EFA_TYPE_EXAMPLES[0]} "
                f"(others: {', '.join(EFA_TYPE_EXAMPLES[1:])}), or pulumi config set {NAMESPACE}:efa false")
        counts[instance_type] = max(1, min(int(kind.efa_maximum_interfaces or 1), int(kind.maximum_network_cards or 1)))
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{instance_type} {count}" for instance_type, count in counts.items())
        raise StackConfigError(
            f"{NAMESPACE}:efa gives each factory every EFA interface of its type, but {NAMESPACE}:factoryTypes "
            f"differ in how many they have ({listed}), and one launch template serves them all: list types with "
            f"as many, e.g. pulumi config rm --path '{NAMESPACE}:factoryTypes[{len(counts) - 1}]'")
    count = next(iter(counts.values()))
    if count > 1 and config.associate_public_ip:
        raise StackConfigError(
            f"{NAMESPACE}:efa gives each {instance_types[0]} its {count} EFA interfaces, and EC2 gives no public "
            f"address to an instance launched with more than one interface: deploy from inside the VPC and "
            f"pulumi config set {NAMESPACE}:associatePublicIp false")
    return count


def placement_group(config: ClusterConfig, tags: dict[str, str], opts: pulumi.ResourceOptions
                    ) -> aws.ec2.PlacementGroup:
    return aws.ec2.PlacementGroup(
        f"{config.name}_placement",
        strategy=config.placement_group,
        partition_count=(config.partition_count or 2) if config.placement_group == "partition" else None,
        tags=tags,
        opts=opts,
    )


def efa_network_interfaces(config: ClusterConfig, count: int) -> list:
    """The factories' network interfaces: an EFA with its IP address on network card 0, then an EFA-only
    interface (no IP address used) on each further card at device index 1, all in the user's security groups
    (the layout of AWS's P5 run-instances example). The subnet is the fleet's override."""
    return [
        aws.ec2.LaunchTemplateNetworkInterfaceArgs(
            network_card_index=card,
            device_index=0 if card == 0 else 1,
            interface_type="efa" if card == 0 else "efa-only",
            security_groups=config.security_group_ids,
            delete_on_termination="true",
            associate_public_ip_address=("true" if config.associate_public_ip else "false") if count == 1 else None,
        )
        for card in range(count)
    ]
