"""`flambe-deploy check`: read-only preflight of the network a cluster uses and of the capacity its stack asks EC2 for
(offerings and vCPU quotas), with boto3's default credentials."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flambe_iac import __version__
from flambe_iac.aws.capacity import (FALLBACK, ON_DEMAND, QUOTA_NAMES, SPOT, Candidate, Reading, Shape, candidates,
                                      capacity_finding, first_fit, read_capacity, service_quotas_client)
from flambe_iac.aws.client import ec2_client, service_client
from flambe_iac.aws.leftovers import find_flambe_instances, leftovers_report, marked
from flambe_iac.aws import network as aws_network
from flambe_iac.aws.preflight import FAIL, Finding, check_network
from flambe_iac.aws.s3_access import check_s3_access
from flambe_iac.engine.ray_cluster import MEMBER_PORT_RANGES
from flambe_iac.errors import EXIT_HOST_FAILED, EXIT_OK, InputError, exit_code_of
from flambe_iac.inputs.outputs import load_outputs, parse_outputs
from flambe_iac.inputs.pulumi_cli import stack_outputs_document
from flambe_iac.inputs.s3_location import split_s3_pairs
from flambe_iac.inputs.stack_config import cluster_named_in_config, cluster_named_in_stack, parse_cidr, read_source
from flambe_iac.local_files import write_json_atomically
from flambe_iac.terminal import safe_field

EPILOG = """\
It reads, and never changes: the subnet, the security groups (and that they are in the subnet's VPC), the key pair,
inbound tcp 22 from where you deploy, tcp 22 between members (a self-referencing rule or the subnet's CIDR), tcp 49556
and 49558 for the report site, and the subnet's network ACL in both directions. Each failure comes with the
`aws ec2 ...` command that would add what is missing. With --ray, also the ports Ray uses between members (tcp
6379-6384, 10002-19999 and 52365: flambe-deploy --ray fixes every port Ray opens to these).

With --efa (or flambe:efa true in the stack's config), also that one security group allows all traffic in from and
out to itself, which EFA needs in both directions: a rule from the subnet's CIDR does not do.

With --stack or --config, also the capacity (of the config's flambe:factoryTypes, orchestratorTypes, subnetIds,
factoryCount and spot, or the stack's defaults: m5.large, one factory, on-demand): one table of the factories'
(type, zone) candidates in EC2 Fleet's order (types outer, subnets inner), each with whether its zone offers the
type and whether the account's vCPU quota for the type's family (Service Quotas; spot: true asks the spot quota,
fallback either, otherwise on-demand), minus the vCPUs running now, holds the factories and the orchestrator; the
first that fits is marked. When none does, the
`aws service-quotas request-service-quota-increase` line that would raise the quota. Every subnet of subnetIds gets
the network checks. --report FILE writes the findings and the table as JSON.

With --leftovers, it lists instead every pending, running, stopping or stopped instance tagged Purpose=flambe in the
region (cluster, role, creator, type, launch time, state), and prints the `aws ec2 terminate-instances` line for the
leftovers; it never terminates anything. --stack, --config or --outputs scope the listing to that cluster, in its
region (and, from a config, its creator): with --stack or --outputs, the instances those outputs name are not
leftovers (after `pulumi destroy`, none is named); with --config (no pulumi CLI needed), every instance of the
cluster is. With none of them, every flambe instance found is listed as a leftover: check before terminating.
--region and --creator may narrow a scope that names none; one that contradicts it is refused. Outputs are those
of the last successful `pulumi up`: an instance a failed or running `up` created is listed as a leftover, and an
--outputs file names no creator (pass --creator, or another person's cluster of that name is listed too).
  flambe-deploy check --leftovers --region us-east-1 --creator ci-exp42
  flambe-deploy check --leftovers --stack dev --report leftovers.json
  flambe-deploy check --leftovers --config infra/Pulumi.dev.yaml

AWS credentials come from boto3's default chain (environment, ~/.aws, SSO, instance role).
A SKIP (a quota Service Quotas cannot give) does not fail the check: read the table's verdicts.
exit codes: 0 every check passed (no leftover), 1 something is missing (no candidate fits; a leftover found), 2 bad
input, no credentials, or an AWS error."""


def define_check(parser: argparse.ArgumentParser) -> None:
    """The check command's flags, on its parser in flambe-deploy's tree (its one-line summary is the tree's)."""
    parser.epilog = EPILOG
    parser.description = ("Check, without changing anything, that the cluster's network lets flambe-deploy and the "
                          "members through and, from a stack's config, that EC2 offers and your vCPU quotas hold the "
                          "cluster it asks for; or, with --leftovers, list the flambe instances still alive.")
    parser.set_defaults(handler=lambda arguments: exit_code_of("flambe-deploy check", lambda: run_check(arguments)))
    parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--stack", metavar="NAME", help="read the stack's config with `pulumi config --json`")
    source.add_argument("--config", type=Path, metavar="Pulumi.<stack>.yaml", help="read a stack config file")
    source.add_argument("--outputs", type=Path, metavar="FILE", help="read the instances named in stack outputs")
    parser.add_argument("--from", dest="from_cidr", metavar="CIDR",
                        help="where you deploy from (default: this machine's public address, if it can be found)")
    parser.add_argument("--region", help="AWS region (default: the stack's aws:region, or your AWS configuration)")
    parser.add_argument("--ray", action="store_true",
                        help="also check that members accept Ray's ports from each other (for flambe-deploy --ray)")
    parser.add_argument("--efa", action="store_true",
                        help="also check the security-group rule EFA needs (implied by flambe:efa true in the config)")
    leftovers = parser.add_argument_group("leftovers")
    leftovers.add_argument("--leftovers", action="store_true",
                           help="list the live instances tagged Purpose=flambe, read-only (exit 1 if one is a leftover)")
    leftovers.add_argument("--creator", metavar="NAME", help="only instances whose creator tag is NAME")
    leftovers.add_argument("--cluster", metavar="NAME", help="only instances whose Cluster-Name tag is NAME")
    parser.add_argument("--resource", dest="resources", action="append", default=[],
                        metavar="NAME=s3://BUCKET/PREFIX",
                        help="also check that the stack's instance profile (flambe:iamInstanceProfile, or "
                             "--instance-profile) exists and that its role may read the prefix (s3:GetObject), and "
                             "warn when it may write, delete, or read other buckets (repeatable)")
    parser.add_argument("--instance-profile", metavar="NAME",
                        help="the instance profile the hosts run with, if not the stack's")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="also write what was found (the findings and the capacity table, or the leftovers) to "
                             "FILE, as JSON")


def run_check(arguments: argparse.Namespace) -> int:
    if arguments.leftovers:
        return run_leftovers(arguments)
    misplaced = [flag for flag, value in (("--creator", arguments.creator), ("--cluster", arguments.cluster))
                 if value]
    if misplaced:
        raise InputError(f"{', '.join(misplaced)} go with --leftovers")
    if not (arguments.stack or arguments.config or arguments.outputs):
        raise InputError("give the cluster's network with --stack NAME, --config Pulumi.<stack>.yaml or --outputs "
                         "FILE (or list leftover instances with --leftovers)")
    deploy_cidr = parse_cidr(arguments.from_cidr) if arguments.from_cidr else None
    local, s3_resources = split_s3_pairs(arguments.resources)
    if local:
        raise InputError(f"check --resource {local[0]}: only an S3 resource (NAME=s3://BUCKET/PREFIX) has access "
                         "to check")
    source = read_source(arguments)
    ec2 = ec2_client(arguments.region or source.get("region"))
    networks = [aws_network.read_network(ec2, {**source, "subnet_id": subnet_id})
                for subnet_id in source.get("subnet_ids", [source.get("subnet_id")])]
    if deploy_cidr is None:
        deploy_cidr = aws_network.this_machines_address()
    findings = []
    for network in networks:  # one finding of the groups or the key pair, not one a subnet
        findings += [finding for finding in check_network(network, deploy_cidr,
                                                          MEMBER_PORT_RANGES if arguments.ray else (),
                                                          efa=arguments.efa or bool(source.get("efa")))
                     if finding not in findings]
    print_findings(findings)
    report = {"region": ec2.meta.region_name}
    if arguments.stack or arguments.config:  # a config that names no capacity key still launches m5.large
        finding, report["capacity"] = check_capacity(ec2, source)
        findings.append(finding)
    findings += check_s3_resources(s3_resources, arguments.instance_profile or source.get("instance_profile"))
    failed = sum(finding.status == FAIL for finding in findings)
    print(f"{len(findings) - failed} of {len(findings)} checks passed" + (f", {failed} failed" if failed else ""))
    write_report(arguments.report, {**report, "findings": [asdict(finding) for finding in findings]})
    return EXIT_HOST_FAILED if failed else EXIT_OK


def check_capacity(ec2, source: dict) -> tuple[Finding, dict]:
    """The offering and quota table of the stack's candidates, printed; its finding and its report."""
    shape = Shape(source["factory_types"], source["orchestrator_types"], source["subnet_ids"], source["factory_count"],
                  source["market"], source["reservation"])
    reading = read_capacity(ec2, service_quotas_client(ec2), shape)
    found = candidates(shape, reading)
    for line in capacity_table(shape, found, reading):
        print(safe_field(line))
    finding = capacity_finding(shape, found, reading.region)
    print_findings([finding])
    return finding, capacity_report(shape, found, reading)


def check_s3_resources(resources: list, profile: str | None) -> list[Finding]:
    if not resources:
        return []
    findings = check_s3_access(service_client("iam"), profile, resources)
    print_findings(findings)
    return findings


def print_findings(findings: list[Finding]) -> None:
    for finding in findings:
        print(safe_field(f"{finding.status}  {finding.check}: {finding.detail}"))
        for fix in finding.fixes:
            print(safe_field(f"      fix: {fix}"))


def write_report(path: Path | None, report: dict) -> None:
    if path is None:
        return
    try:
        write_json_atomically(path, report)
    except OSError as error:
        raise InputError(f"cannot write --report {path}: {error.strerror}") from None


def run_leftovers(arguments: argparse.Namespace) -> int:
    scope = leftovers_scope(arguments)
    ec2 = ec2_client(scope.region)
    instances = find_flambe_instances(ec2, scope.creator, scope.cluster)
    if scope.named is not None:
        instances = marked(instances, scope.named)
    report = leftovers_report(ec2.meta.region_name, instances, scope.source)
    for instance in instances:
        print(safe_field(f"{'LEFTOVER' if instance.leftover else 'IN STACK'}  {instance.instance_id}  "
                         f"cluster={instance.cluster}  role={instance.role}  creator={instance.creator}  "
                         f"{instance.instance_type}  {instance.state}  launched {instance.launch_time}"))
    where = f"{len(instances)} flambe instance{'s' if len(instances) != 1 else ''} in {ec2.meta.region_name}"
    unscoped = "" if scope.named is not None else " (no outputs name any: every one)"
    print(f"{where}; {report['leftovers']} leftover{unscoped}")
    if report["terminate"]:
        warning = "" if scope.cluster else " (no cluster given: some may be other clusters' that their stacks track; " \
                                           "check each before you run it)"
        print(safe_field(f"      to terminate them{warning}: {report['terminate']}"))
        if scope.cluster and not scope.creator:
            print("      (no creator given: another person's cluster of this name in this region is listed too; "
                  "check each before you run it, or pass --creator)")
    write_report(arguments.report, report)
    return EXIT_HOST_FAILED if report["leftovers"] else EXIT_OK


@dataclass(frozen=True)
class LeftoversScope:
    """Which instances to list, and which the outputs name (None: no outputs given, every one is a leftover)."""

    cluster: str | None = None
    creator: str | None = None
    region: str | None = None
    named: set[str] | None = None
    source: str | None = None


def leftovers_scope(arguments: argparse.Namespace) -> LeftoversScope:
    """A stack, its config file or its outputs scope the listing to that cluster (and region, and creator); a
    destroyed stack's empty outputs name no instance."""
    if arguments.config is not None:
        cluster, region, creator = cluster_named_in_config(arguments.config)
        scope = LeftoversScope(cluster, creator, region, source=str(arguments.config))
    elif arguments.stack is not None:
        cluster, region, creator = cluster_named_in_stack(arguments.stack)
        document = stack_outputs_document(arguments.stack)
        named = {host.id for host in parse_outputs(document, source=f"stack {arguments.stack!r}").members} \
            if document != {} else set()
        scope = LeftoversScope(cluster, creator, region, named, f"stack {arguments.stack}")
    elif arguments.outputs is not None:
        outputs = load_outputs(arguments.outputs)
        scope = LeftoversScope(outputs.name, None, outputs.region, {host.id for host in outputs.members},
                               str(arguments.outputs))
    else:
        return LeftoversScope(arguments.cluster, arguments.creator, arguments.region)
    given = {"cluster": arguments.cluster, "region": arguments.region, "creator": arguments.creator}
    for name, value in given.items():
        named = getattr(scope, name)
        if value is not None and named is not None and value != named:
            raise InputError(f"--{name} {value!r} is not the {name} {scope.source} names ({named})")
    return replace(scope, region=scope.region or arguments.region, creator=scope.creator or arguments.creator)


def capacity_table(shape: Shape, found: list[Candidate], reading: Reading) -> list[str]:
    """The candidates in EC2 Fleet's order, the first that fits marked, then the quotas read."""
    markets = {ON_DEMAND: "on-demand", SPOT: "spot", FALLBACK: "spot, then on-demand"}[shape.market]
    lines = [f"capacity: {shape.factory_count} factor{'y' if shape.factory_count == 1 else 'ies'} ({markets}) and "
             f"an orchestrator (on-demand: {', '.join(shape.orchestrator_types)}), candidates in EC2 Fleet's order",
             f"     {'#':>3}  {'type':<16} {'zone':<16} {'subnet':<26} {'offered':<8} {'vCPUs':>6}  verdict"]
    chosen = first_fit(found)
    for candidate in found:
        mark = "  ->" if candidate is chosen else "    "
        vcpus = str(candidate.vcpus) if isinstance(candidate.vcpus, int) else "?"
        lines.append(f"{mark} {candidate.rank:>3}  {candidate.instance_type:<16} {candidate.zone or '-':<16} "
                     f"{candidate.subnet_id:<26} {'yes' if candidate.offered else 'no':<8} {vcpus:>6}  "
                     f"{candidate_verdict(candidate)}")
    for quota in reading.quotas.values():
        value = "?" if quota.value is None else str(quota.value)
        in_use = "?" if quota.in_use is None else str(quota.in_use)
        lines.append(f"     quota {quota.code} ({QUOTA_NAMES.get(quota.code, 'vCPUs')}): {value} vCPUs, {in_use} in use"
                     + (f" ({quota.cause})" if quota.cause else ""))
    return lines


def candidate_verdict(candidate: Candidate) -> str:
    if candidate.zone is None:
        return f"{candidate.subnet_id} does not exist in this region"
    if not candidate.offered:
        return f"{candidate.zone} does not offer {candidate.instance_type}"
    words = {True: "fits", False: "too small", None: "cannot tell"}
    return "; ".join(f"{verdict.market} {words[verdict.fits]}: {verdict.cause}"
                     + (f" (orchestrator {verdict.orchestrator})" if verdict.fits else "")
                     for verdict in candidate.verdicts)


def capacity_report(shape: Shape, found: list[Candidate], reading: Reading) -> dict:
    chosen = first_fit(found)
    return {"market": shape.market, "factory_count": shape.factory_count,
            "chosen": None if chosen is None else chosen.rank,
            "candidates": [{"rank": c.rank, "instance_type": c.instance_type, "subnet_id": c.subnet_id,
                            "zone": c.zone, "offered": c.offered,
                            "vcpus": c.vcpus if isinstance(c.vcpus, int) else None,
                            "verdicts": [{"market": v.market, "fits": v.fits, "cause": v.cause,
                                          "orchestrator": v.orchestrator} for v in c.verdicts]} for c in found],
            "quotas": [{"code": q.code, "value": q.value, "in_use": q.in_use, "cause": q.cause}
                       for q in reading.quotas.values()]}
