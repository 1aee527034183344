"""`flambe-deploy check`: read-only preflight of the network a cluster uses, with boto3's default credentials."""

from __future__ import annotations

import argparse
from pathlib import Path

from flambe_iac import __version__
from flambe_iac.aws.client import ec2_client
from flambe_iac.aws.network import read_network, this_machines_address
from flambe_iac.aws.preflight import FAIL, check_network
from flambe_iac.engine.ray_cluster import MEMBER_PORT_RANGES
from flambe_iac.errors import EXIT_HOST_FAILED, EXIT_OK, exit_code_of
from flambe_iac.inputs.stack_config import parse_cidr, read_source
from flambe_iac.terminal import safe_field

EPILOG = """\
It reads, and never changes: the subnet, the security groups (and that they are in the subnet's VPC), the key pair,
inbound tcp 22 from where you deploy, tcp 22 between members (a self-referencing rule or the subnet's CIDR), tcp 49556
and 49558 for the report site, and the subnet's network ACL in both directions. Each failure comes with the
`aws ec2 ...` command that would add what is missing. With --ray, also the ports Ray uses between members (tcp
6379-6384, 10002-19999 and 52365: flambe-deploy --ray fixes every port Ray opens to these).

AWS credentials come from boto3's default chain (environment, ~/.aws, SSO, instance role).
exit codes: 0 every check passed, 1 something is missing, 2 bad input or no credentials."""


def add_command(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "check", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="read-only preflight of the network on AWS: security groups, key pair, network ACL",
        description="Check, without changing anything, that the cluster's network lets flambe-deploy and the "
                    "members through.")
    parser.set_defaults(handler=lambda arguments: exit_code_of("flambe-deploy check", lambda: run_check(arguments)))
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


def run_check(arguments: argparse.Namespace) -> int:
    deploy_cidr = parse_cidr(arguments.from_cidr) if arguments.from_cidr else None
    source = read_source(arguments)
    network = read_network(ec2_client(arguments.region or source.get("region")), source)
    if deploy_cidr is None:
        deploy_cidr = this_machines_address()
    findings = check_network(network, deploy_cidr, MEMBER_PORT_RANGES if arguments.ray else ())
    for finding in findings:
        print(safe_field(f"{finding.status}  {finding.check}: {finding.detail}"))
        for fix in finding.fixes:
            print(safe_field(f"      fix: {fix}"))
    failed = sum(finding.status == FAIL for finding in findings)
    print(f"{len(findings) - failed} of {len(findings)} checks passed" + (f", {failed} failed" if failed else ""))
    return EXIT_HOST_FAILED if failed else EXIT_OK
