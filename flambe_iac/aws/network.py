"""What the preflight reads of a network: the subnet, the security groups, the key pair and the network ACL."""

from __future__ import annotations

import ipaddress
import urllib.request

from flambe_iac.aws.client import aws_errors
from flambe_iac.aws.preflight import Network
from flambe_iac.errors import InputError

PUBLIC_ADDRESS_URL = "https://checkip.amazonaws.com"


def read_network(ec2, source: dict) -> Network:
    """What EC2 says of the subnet, groups, key pair and network ACL that SOURCE names (or its instances use)."""
    with aws_errors("reading the network (ec2:Describe*)"):
        if "instance_ids" in source:
            source = {**source, **instances_network(ec2, source["instance_ids"])}
        network = Network(region=ec2.meta.region_name, subnet_id=source["subnet_id"],
                          group_ids=source["group_ids"], key_name=source.get("key_name"))
        network.subnet = describe_one(ec2.describe_subnets, "Subnets", SubnetIds=[network.subnet_id])
        for group_id in network.group_ids:
            group = describe_one(ec2.describe_security_groups, "SecurityGroups", GroupIds=[group_id])
            if group is not None:
                network.groups[group_id] = group
        if network.key_name:
            network.key_pair_found = describe_one(ec2.describe_key_pairs, "KeyPairs",
                                                  KeyNames=[network.key_name]) is not None
        if network.subnet is not None:
            network.network_acl = subnet_network_acl(ec2, network.subnet)
        return network


def describe_one(call, key: str, **arguments):
    """The one item a describe call names, or None if EC2 says it does not exist."""
    from botocore.exceptions import ClientError

    try:
        items = call(**arguments)[key]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code", "").endswith((".NotFound", ".Malformed")):
            return None
        raise
    return items[0] if items else None


def instances_network(ec2, instance_ids: list[str]) -> dict:
    reservations = ec2.describe_instances(InstanceIds=instance_ids)["Reservations"]
    instances = [instance for reservation in reservations for instance in reservation["Instances"]]
    if not instances:
        raise InputError(f"none of the instances {', '.join(instance_ids)} exists in {ec2.meta.region_name}")
    first = instances[0]
    return {"subnet_id": first["SubnetId"], "group_ids": [group["GroupId"] for group in first["SecurityGroups"]],
            "key_name": first.get("KeyName")}


def subnet_network_acl(ec2, subnet: dict) -> dict | None:
    """The subnet's network ACL: the one associated with it, else its VPC's default."""
    associated = ec2.describe_network_acls(
        Filters=[{"Name": "association.subnet-id", "Values": [subnet["SubnetId"]]}])["NetworkAcls"]
    if associated:
        return associated[0]
    defaults = ec2.describe_network_acls(Filters=[{"Name": "vpc-id", "Values": [subnet["VpcId"]]},
                                                  {"Name": "default", "Values": ["true"]}])["NetworkAcls"]
    return defaults[0] if defaults else None


def this_machines_address() -> str | None:
    """This machine's public address as AWS sees it, or None if it cannot be found quickly."""
    try:
        with urllib.request.urlopen(PUBLIC_ADDRESS_URL, timeout=3) as response:
            address = response.read().decode().strip()
        return f"{ipaddress.ip_address(address)}/32"
    except (OSError, ValueError):
        return None
