"""`flambe-deploy check`: read-only preflight of the network a cluster uses, with boto3's default credentials."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path

from flambe_iac import __version__
from flambe_iac.errors import EXIT_HOST_FAILED, EXIT_OK, InputError, exit_code_of

PUBLIC_ADDRESS_URL = "https://checkip.amazonaws.com"

EPILOG = """\
It reads, and never changes: the subnet, the security groups (and that they are in the subnet's VPC), the key pair,
inbound tcp 22 from where you deploy, tcp 22 between members (a self-referencing rule or the subnet's CIDR), tcp 49556
and 49558 for the report site, and the subnet's network ACL in both directions. Each failure comes with the
`aws ec2 ...` command that would add what is missing. With --ray, also the ports Ray uses between members (tcp
6379-6384, 10002-19999 and 52365: flambe-deploy --ray fixes every port Ray opens to these).

AWS credentials come from boto3's default chain (environment, ~/.aws, SSO, instance role).
exit codes: 0 every check passed, 1 something is missing, 2 bad input or no credentials."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flambe-deploy check", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Check, without changing anything, that the cluster's network lets "
                                                 "flambe-deploy and the members through.")
    parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--stack", metavar="NAME", help="read the stack's config with `pulumi config --json`")
    source.add_argument("--config", type=Path, metavar="Pulumi.<stack>.yaml", help="read a stack config file")
    source.add_argument("--outputs", type=Path, metavar="FILE", help="read the instances named in stack outputs")
    parser.add_argument("--from", dest="from_cidr", metavar="CIDR",
                        help="where you deploy from (default: this machine's public address, if it can be found)")
    parser.add_argument("--region", help="AWS region (default: the stack's aws:region, or your AWS configuration)")
    parser.add_argument("--ray", action="store_true",
                        help="also check that members accept Ray's ports from each other (for flambe-deploy --ray)")
    return parser


def main(argv: list[str]) -> int:
    arguments = build_parser().parse_args(argv)
    return exit_code_of("flambe-deploy check", lambda: run_check(arguments))


def run_check(arguments: argparse.Namespace) -> int:
    from flambe_iac.aws.client import ec2_client
    from flambe_iac.aws.preflight import FAIL, check_network

    deploy_cidr = parse_cidr(arguments.from_cidr) if arguments.from_cidr else None
    source = read_source(arguments)
    region = arguments.region or source.get("region")
    ec2 = ec2_client(region)
    network = read_network(ec2, source)
    if deploy_cidr is None:
        deploy_cidr = this_machines_address()
    member_ports = ()
    if arguments.ray:
        from flambe_iac.engine.ray_cluster import MEMBER_PORT_RANGES as member_ports
    findings = check_network(network, deploy_cidr, member_ports)
    for finding in findings:
        print(f"{finding.status}  {finding.check}: {finding.detail}")
        for fix in finding.fixes:
            print(f"      fix: {fix}")
    failed = sum(finding.status == FAIL for finding in findings)
    print(f"{len(findings) - failed} of {len(findings)} checks passed" + (f", {failed} failed" if failed else ""))
    return EXIT_HOST_FAILED if failed else EXIT_OK


def parse_cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise InputError(f"--from {text!r} is not an address or CIDR such as 203.0.113.7/32") from None


def read_source(arguments: argparse.Namespace) -> dict:
    """{region, subnet_id, group_ids, key_name} from a stack, a stack config file, or the outputs' instances."""
    if arguments.config is not None:
        return source_from_config(arguments.config)
    if arguments.stack is not None:
        return source_from_stack(arguments.stack)
    from flambe_iac.inputs.outputs import load_outputs

    cluster = load_outputs(arguments.outputs)
    return {"region": cluster.region, "instance_ids": [host.id for host in cluster.members]}


def source_from_config(path: Path) -> dict:
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"cannot read stack config {path}: {getattr(error, 'strerror', None) or 'not valid YAML'}") \
            from None
    return config_values(document.get("config") or {}, str(path))


def source_from_stack(stack: str) -> dict:
    from flambe_iac.inputs.pulumi_cli import stack_config

    return config_values(stack_config(stack), f"stack {stack!r}")


def config_values(config: dict, source: str) -> dict:
    def value(key):
        item = config.get(key)
        if isinstance(item, dict) and "secure" in item:
            raise InputError(f"{source}: {key} is encrypted; check needs it in clear")
        return item

    groups = value("flambe:securityGroupIds")
    if isinstance(groups, str):
        try:
            groups = json.loads(groups)
        except json.JSONDecodeError:
            groups = [groups]
    subnet = value("flambe:subnetId")
    if not subnet or not groups:
        raise InputError(f"{source}: flambe:subnetId and flambe:securityGroupIds are needed for the check")
    return {"region": value("aws:region"), "subnet_id": subnet, "group_ids": list(groups),
            "key_name": value("flambe:keyName")}


def read_network(ec2, source: dict):
    from flambe_iac.aws.client import aws_errors
    from flambe_iac.aws.preflight import Network

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
    import urllib.request

    try:
        with urllib.request.urlopen(PUBLIC_ADDRESS_URL, timeout=3) as response:
            address = response.read().decode().strip()
        return f"{ipaddress.ip_address(address)}/32"
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
