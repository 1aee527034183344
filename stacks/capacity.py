"""Where EC2 has room: one EC2 Fleet of type instant per role, over the ordered instance types x subnets, all of its
instances in one zone and one type, or none.

The provider (terraform-provider-aws's aws_ec2_fleet, under pulumi_aws) does not look at CreateFleet's `Errors`: an
instant fleet that launched nothing is created all the same, with an empty `fleet_instance_set`. So the program
checks what each fleet launched and, when it is short, fails the update itself with EC2's reason for every
candidate (read with DescribeFleets, by the fleet's id), and the next run asks EC2 again: a fleet whose launch no
live instance shows is declared with a new attempt, which replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from flambe_iac.aws.fleets import (StackReadError, account_of, cluster_instances, fleet_errors, fleet_order,
                                   stack_ec2)
from flambe_iac.stacks.cluster_config import NAMESPACE, ClusterConfig
from flambe_iac.stacks.launches import ATTEMPT_TAG
from flambe_iac.terminal import safe_field

ON_DEMAND, SPOT, CAPACITY_BLOCK = "on-demand", "spot", "capacity-block"
MAX_REASON = 300  # characters of one EC2 reason shown


class CapacityError(pulumi.RunError):
    """EC2 had no candidate that could hold the whole role; the message lists each candidate and why."""


@dataclass(frozen=True)
class Candidate:
    instance_type: str
    subnet_id: str
    zone: str

    def named(self) -> str:
        return f"{self.instance_type} in {self.zone} ({self.subnet_id})"


def candidates(types: list[str], subnets: list[str], zones: dict[str, str]) -> list[Candidate]:
    """Types x subnets in the order given: the first type in each zone, then the next type."""
    return [Candidate(instance_type, subnet, zones[subnet]) for instance_type, subnet in fleet_order(types, subnets)]


def fleet(name: str, count: int, market: str, template: aws.ec2.LaunchTemplate, choices: Any,
          config: ClusterConfig, tags: dict[str, str], attempt: str, opts: pulumi.ResourceOptions) -> aws.ec2.Fleet:
    """An instant fleet of COUNT instances over CHOICES (a list of Candidate, or an Output of one), each a priority
    in order (1 first: the provider drops a priority of 0). min_target_capacity = COUNT with one zone and one type:
    EC2 launches all of them in one (type, zone), or nothing."""
    spot = market == SPOT
    overrides = pulumi.Output.from_input(choices).apply(lambda items: [
        aws.ec2.FleetLaunchTemplateConfigOverrideArgs(
            instance_type=item.instance_type, subnet_id=item.subnet_id, priority=float(rank),
            max_price=config.spot_max_price if spot else None)
        for rank, item in enumerate(items, start=1)])
    all_or_none = dict(min_target_capacity=count, single_availability_zone=True, single_instance_type=True)
    return aws.ec2.Fleet(
        name,
        type="instant",
        launch_template_configs=[aws.ec2.FleetLaunchTemplateConfigArgs(
            launch_template_specification=aws.ec2.FleetLaunchTemplateConfigLaunchTemplateSpecificationArgs(
                launch_template_id=template.id, version=template.latest_version.apply(str)),
            overrides=overrides)],
        target_capacity_specification=aws.ec2.FleetTargetCapacitySpecificationArgs(
            default_target_capacity_type=SPOT if spot else ON_DEMAND, total_target_capacity=count),
        on_demand_options=None if spot else aws.ec2.FleetOnDemandOptionsArgs(
            allocation_strategy="prioritized", **all_or_none),
        spot_options=aws.ec2.FleetSpotOptionsArgs(
            allocation_strategy="capacity-optimized-prioritized", instance_interruption_behavior="terminate",
            **all_or_none) if spot else None,
        # Deleting the fleet (a smaller cluster, a destroy) terminates what it launched.
        terminate_instances=True,
        tags={**tags, ATTEMPT_TAG: attempt},
        # A new attempt (the last one launched nothing) replaces the fleet; nothing else about it may replace a
        # running instance: an instant fleet cannot be modified, and its launch is done.
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(
            replacement_trigger=attempt,
            ignore_changes=["launchTemplateConfigs", "targetCapacitySpecification", "onDemandOptions",
                            "spotOptions", "tags"])),
    )


def launched(target: aws.ec2.Fleet, attempt: str, count: int, choices: Any, what: str, region: str,
             market: str = ON_DEMAND, otherwise=None, earlier: tuple[str, ...] = ()) -> pulumi.Output:
    """[(instance id, instance type, lifecycle)] of TARGET's COUNT instances; when it launched fewer, what OTHERWISE
    (given the lines of this attempt) returns, or a CapacityError naming every candidate tried (EARLIER's lines,
    then this fleet's) and EC2's reason for each. ATTEMPT: the one TARGET was declared with."""
    def check(args):
        fleet_id, sets, items, tags, urn = args
        check_replaced(what, attempt, (tags or {}).get(ATTEMPT_TAG), urn)
        members = [(instance_id, field_of(entry, "instance_type"), field_of(entry, "lifecycle"))
                   for entry in sets or [] for instance_id in field_of(entry, "instance_ids") or []]
        if len(members) >= count:
            return members[:count]
        tried = (*earlier, *tried_lines(market, items, reasons_of(region, fleet_id)))
        if otherwise is not None:
            return otherwise(tried)
        raise CapacityError(failure_message(what, count, items, tried))
    return pulumi.Output.all(target.id, target.fleet_instance_sets, choices, target.tags, target.urn).apply(check)


def check_replaced(what: str, attempt: str, kept_attempt: str | None, urn: str) -> None:
    """A fleet declared with a new attempt must be a new fleet: an engine that ignores replacementTrigger keeps the
    old one (its tags, ignored as changes, still name the old attempt), whose record would stand for members gone."""
    if kept_attempt != attempt:
        raise pulumi.RunError(
            f"the {what} fleet was declared with attempt {attempt} to be replaced (no live instance shows its attempt "
            f"{safe_field(str(kept_attempt)[:20])}), but the engine kept it: this Pulumi CLI ignores the "
            f"replacementTrigger resource option. Upgrade the Pulumi CLI (curl -fsSL https://get.pulumi.com | sh), "
            f"or replace the fleet by hand: pulumi up --replace '{urn}'")


def field_of(entry: Any, key: str) -> Any:
    """A nested output value, as the SDK hands it over: an output type, or a dict in camelCase."""
    if isinstance(entry, dict):
        camel = key.split("_")[0] + "".join(part.title() for part in key.split("_")[1:])
        return entry.get(key, entry.get(camel))
    return getattr(entry, key, None)


def ec2_reader(region: str):
    """The program's own read-only EC2 client (what the provider offers no data source for), with the stack's
    aws:profile when it sets one."""
    return stack_ec2(region, pulumi.Config("aws").get("profile"))


def check_same_account(region: str) -> None:
    """The program's own reads (the cluster's instances, the reasons of a failure) must see the account the provider
    deploys to; else a running cluster would look absent and be launched twice."""
    provider = aws.get_caller_identity().account_id
    profile = pulumi.Config("aws").get("profile")
    ours = account_of(region, profile)
    if ours != provider:
        raise pulumi.RunError(
            f"the AWS provider deploys to account {provider}, but the credentials the program reads EC2 with (boto3's "
            f"default chain{', profile ' + profile if profile else ''}) are of account {ours}: the program reads the "
            f"cluster's instances itself, so give both the same account, e.g. export AWS_PROFILE=<the stack's profile>")


def reasons_of(region: str, fleet_id: str) -> dict[tuple[str, str], str]:
    """{(instance type, subnet or zone): EC2's code and message} of an instant fleet, read with DescribeFleets."""
    errors, problem = fleet_errors(ec2_reader(region), fleet_id)
    reasons = {("", ""): problem} if problem else {}
    for item in errors:
        overrides = (item.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
        reason = safe_field(f"{item.get('ErrorCode', '?')}: {item.get('ErrorMessage', '')}"[:MAX_REASON])
        for where in (overrides.get("SubnetId"), overrides.get("AvailabilityZone")):
            if where:
                reasons[(str(overrides.get("InstanceType", "")), str(where))] = reason
    return reasons


def tried_lines(market: str, items: list[Candidate], reasons: dict[tuple[str, str], str]) -> list[str]:
    """One line per candidate, in order: where, the market asked, and EC2's reason."""
    lines = []
    for item in items:
        reason = reasons.get((item.instance_type, item.subnet_id)) or reasons.get((item.instance_type, item.zone))
        lines.append(f"  {item.named()}, {market}: {reason or 'no reason given by EC2'}")
    if ("", "") in reasons:
        lines.append(f"  ({reasons[('', '')]})")
    return lines


def failure_message(what: str, count: int, items: list[Candidate], tried: tuple[str, ...]) -> str:
    lines = [f"EC2 could not launch all {count} {what} in any one (type, zone) of the stack's lists; it launched "
             f"none, so nothing of this attempt runs or bills. Tried, in order:", *tried]
    types = f"{NAMESPACE}:{'orchestratorTypes' if what == 'orchestrator' else 'factoryTypes'}"
    fewer = "" if what == "orchestrator" else \
        f", fewer factories (pulumi config set {NAMESPACE}:factoryCount {max(1, count // 2)}), spot " \
        f"(pulumi config set {NAMESPACE}:spot fallback)"
    lines.append(
        f"What to change: add a type (pulumi config set --path '{types}[{len({item.instance_type for item in items})}]'"
        f" TYPE), a subnet of another zone (pulumi config set --path '{NAMESPACE}:subnetIds[N]' subnet-0abc){fewer}, "
        f"or raise the vCPU quota where EC2 said VcpuLimitExceeded (flambe-deploy check prints the request). Or run "
        f"pulumi up again later: it asks EC2 anew.")
    return "\n".join(lines)


def live_instances(region: str, cluster: str, role: str) -> list[dict]:
    """The cluster's live instances of ROLE, the record of its launches; a read that cannot complete stops the
    program with why (never "nothing there": Pulumi deletes what the program does not declare)."""
    try:
        return cluster_instances(ec2_reader(region), cluster, role)
    except StackReadError as error:
        raise pulumi.RunError(str(error)) from None
