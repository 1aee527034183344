"""`flambe-deploy check`: a read-only preflight of the user's subnet, security groups, key pair and network ACL.

It never changes anything: every finding that fails comes with the exact `aws ec2 ...` command that would fix it,
for the user to run (or not). The rules are pure functions of EC2's describe results, so they can be tested on
moto and read on their own.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field

SSH_PORT = 22
REPORT_SITE_PORTS = (49556, 49558)
EPHEMERAL_PORTS = (1024, 65535)
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True)
class Finding:
    status: str
    check: str
    detail: str
    fixes: tuple[str, ...] = ()


@dataclass
class Network:
    """What the checks read, as EC2's describe calls return it."""

    region: str
    subnet_id: str
    group_ids: list[str]
    key_name: str | None
    subnet: dict | None = None
    groups: dict[str, dict] = field(default_factory=dict)  # id -> group; missing ids are absent
    key_pair_found: bool = False
    network_acl: dict | None = None


def check_network(network: Network, deploy_cidr: str | None, member_ports: tuple[tuple[int, int], ...] = (),
                  efa: bool = False) -> list[Finding]:
    """MEMBER_PORTS: tcp port ranges members must also accept from each other (Ray's, with --ray).
    EFA: the cluster uses EFA, whose traffic must be allowed within one security group in both directions."""
    findings = [subnet_exists(network), *groups_exist_in_the_subnets_vpc(network), key_pair_exists(network)]
    if network.subnet is None or not network.groups:
        return findings
    subnet_cidr = network.subnet["CidrBlock"]
    groups = [network.groups[group_id] for group_id in network.group_ids if group_id in network.groups]
    if deploy_cidr is None:
        findings.append(Finding(SKIP, "ssh from where you deploy",
                                "could not find this machine's public address: pass --from CIDR to check it"))
    else:
        findings.append(ingress_from_cidr(network, groups, "ssh from where you deploy", SSH_PORT, deploy_cidr))
        for port in REPORT_SITE_PORTS:
            findings.append(ingress_from_cidr(network, groups, f"report site port {port}", port, deploy_cidr))
    findings.append(members_reach_each_other(network, groups, subnet_cidr))
    findings.extend(members_reach_each_other(network, groups, subnet_cidr, ports, "Ray between members")
                    for ports in member_ports)
    if efa:
        findings.append(efa_traffic_within_a_group(network, groups))
    if network.network_acl is not None:
        findings.extend(network_acl_allows(network, deploy_cidr, subnet_cidr, member_ports))
    return findings


def subnet_exists(network: Network) -> Finding:
    if network.subnet is None:
        return Finding(FAIL, "subnet", f"{network.subnet_id} does not exist in {network.region}: "
                                       "check flambe:subnetId and aws:region")
    return Finding(PASS, "subnet", f"{network.subnet_id} exists ({network.subnet['VpcId']}, "
                                   f"{network.subnet['CidrBlock']})")


def groups_exist_in_the_subnets_vpc(network: Network) -> list[Finding]:
    findings = []
    vpc = network.subnet["VpcId"] if network.subnet else None
    for group_id in network.group_ids:
        group = network.groups.get(group_id)
        if group is None:
            findings.append(Finding(FAIL, "security group", f"{group_id} does not exist in {network.region}"))
        elif vpc is not None and group["VpcId"] != vpc:
            findings.append(Finding(FAIL, "security group", f"{group_id} is in {group['VpcId']}, not in the "
                                                            f"subnet's {vpc}: give a group of {vpc}"))
        else:
            findings.append(Finding(PASS, "security group", f"{group_id} ({group.get('GroupName', '')}) is in {vpc}"))
    return findings


def key_pair_exists(network: Network) -> Finding:
    if network.key_name is None:
        return Finding(SKIP, "key pair", "no key pair name to check")
    if not network.key_pair_found:
        return Finding(FAIL, "key pair", f"{network.key_name} does not exist in {network.region}: import your "
                                         "public key or check flambe:keyName",
                       (aws("ec2", "import-key-pair", "--region", network.region, "--key-name", network.key_name,
                            "--public-key-material", "fileb://~/.ssh/id_ed25519.pub"),))
    return Finding(PASS, "key pair", f"{network.key_name} exists")


def ingress_from_cidr(network: Network, groups: list[dict], check: str, port: int, cidr: str) -> Finding:
    source = ipaddress.ip_network(cidr, strict=False)
    for group in groups:
        for permission in group.get("IpPermissions", []):
            if _covers_port(permission, port) and any(
                    _contains(ip_range["CidrIp"], source) for ip_range in permission.get("IpRanges", [])):
                return Finding(PASS, check, f"tcp {port} from {cidr} is allowed by {group['GroupId']}")
    first = groups[0]["GroupId"]
    return Finding(FAIL, check, f"no rule of {', '.join(g['GroupId'] for g in groups)} allows tcp {port} from {cidr}",
                   (aws("ec2", "authorize-security-group-ingress", "--region", network.region, "--group-id", first,
                        "--protocol", "tcp", "--port", str(port), "--cidr", cidr),))


def members_reach_each_other(network: Network, groups: list[dict], subnet_cidr: str,
                             ports: tuple[int, int] = (SSH_PORT, SSH_PORT),
                             check: str = "members reach each other") -> Finding:
    """One rule must let members in on every port of PORTS: from the cluster's own groups, or from the subnet."""
    member_groups = {group["GroupId"] for group in groups}
    subnet = ipaddress.ip_network(subnet_cidr)
    low, high = ports
    port_text = str(low) if low == high else f"{low}-{high}"
    for group in groups:
        for permission in group.get("IpPermissions", []):
            if not _covers_ports(permission, low, high):
                continue
            if any(pair.get("GroupId") in member_groups for pair in permission.get("UserIdGroupPairs", [])):
                return Finding(PASS, check, f"{group['GroupId']} lets the cluster's groups in on tcp {port_text}")
            if any(_contains(ip_range["CidrIp"], subnet) for ip_range in permission.get("IpRanges", [])):
                return Finding(PASS, check, f"{group['GroupId']} lets the subnet {subnet_cidr} in on tcp {port_text}")
    first = groups[0]["GroupId"]
    # For ssh, the usual rule: members trust each other. For more ports, exactly those.
    rule = ("--protocol", "-1") if ports == (SSH_PORT, SSH_PORT) else ("--protocol", "tcp", "--port", port_text)
    return Finding(FAIL, check, f"no rule lets cluster members reach each other on tcp {port_text} (a rule that "
                                f"references the group itself, or one from {subnet_cidr})",
                   (aws("ec2", "authorize-security-group-ingress", "--region", network.region, "--group-id", first,
                        *rule, "--source-group", first),))


def efa_traffic_within_a_group(network: Network, groups: list[dict]) -> Finding:
    """EFA's rule: one of the cluster's groups allows all traffic (every protocol and port) in from itself and out to
    itself. A rule from the subnet's CIDR does not do: EFA's traffic is matched against the group, not addresses."""
    check = "EFA traffic within the group"
    for group in groups:
        if not missing_self_directions(group):
            return Finding(PASS, check, f"{group['GroupId']} allows all traffic in from and out to itself")
    first = groups[0]
    missing = missing_self_directions(first)
    permission = f"IpProtocol=-1,UserIdGroupPairs=[{{GroupId={first['GroupId']}}}]"
    return Finding(FAIL, check, f"no group of {', '.join(g['GroupId'] for g in groups)} allows all traffic in from "
                                f"and out to itself, which EFA needs; {first['GroupId']} lacks {' and '.join(missing)}",
                   tuple(aws("ec2", f"authorize-security-group-{direction}", "--region", network.region, "--group-id",
                             first["GroupId"], "--ip-permissions", permission) for direction in missing))


def missing_self_directions(group: dict) -> list[str]:
    """Of ingress and egress, those in which GROUP has no all-traffic rule that names GROUP itself."""
    def allows_all_with_itself(permissions: list[dict]) -> bool:
        return any(permission.get("IpProtocol") == "-1" and any(
            pair.get("GroupId") == group["GroupId"] for pair in permission.get("UserIdGroupPairs", []))
            for permission in permissions)

    return [direction for direction, key in (("ingress", "IpPermissions"), ("egress", "IpPermissionsEgress"))
            if not allows_all_with_itself(group.get(key, []))]


def network_acl_allows(network: Network, deploy_cidr: str | None, subnet_cidr: str,
                       member_ports: tuple[tuple[int, int], ...] = ()) -> list[Finding]:
    """NACLs are stateless: what comes in on a port must be able to answer back on ephemeral ports."""
    acl = network.network_acl
    flows = [("ingress", SSH_PORT, subnet_cidr, "members' ssh"),
             ("egress", EPHEMERAL_PORTS, subnet_cidr, "answers to members")]
    flows += [("ingress", ports, subnet_cidr, "Ray between members") for ports in member_ports]
    if deploy_cidr is not None:
        flows += [("ingress", SSH_PORT, deploy_cidr, "your ssh")]
        flows += [("ingress", port, deploy_cidr, f"report site port {port}") for port in REPORT_SITE_PORTS]
        flows += [("egress", EPHEMERAL_PORTS, deploy_cidr, "answers to you")]
    findings = []
    for direction, ports, cidr, what in flows:
        verdict, rule = nacl_verdict(acl, direction == "egress", ports, cidr)
        port_text = f"{ports[0]}-{ports[1]}" if isinstance(ports, tuple) else str(ports)
        if verdict:
            findings.append(Finding(PASS, "network ACL", f"{acl['NetworkAclId']} allows {what} "
                                                         f"(tcp {port_text} {direction} {cidr})"))
            continue
        low, high = ports if isinstance(ports, tuple) else (ports, ports)
        findings.append(Finding(
            FAIL, "network ACL", f"{acl['NetworkAclId']} blocks {what} (tcp {port_text} {direction} {cidr})"
                                 + (f" at rule {rule}" if rule is not None else ""),
            (aws("ec2", "create-network-acl-entry", "--region", network.region, "--network-acl-id",
                 acl["NetworkAclId"], "--egress" if direction == "egress" else "--ingress", "--rule-number",
                 str(free_rule_number(acl, direction == "egress")), "--protocol", "tcp",
                 "--port-range", f"From={low},To={high}", "--cidr-block", cidr, "--rule-action", "allow"),),
        ))
    return findings


def nacl_verdict(acl: dict, egress: bool, ports, cidr: str) -> tuple[bool, int | None]:
    """Whether every port of PORTS from (or to) every address of CIDR gets through, by the first matching rule.

    A deny rule that touches any part of the flow counts; an allow rule must cover all of it.
    """
    low, high = ports if isinstance(ports, tuple) else (ports, ports)
    flow = ipaddress.ip_network(cidr, strict=False)
    entries = sorted((entry for entry in acl.get("Entries", []) if entry.get("Egress") == egress),
                     key=lambda entry: entry["RuleNumber"])
    for entry in entries:
        if entry.get("Protocol") not in ("-1", "6") or "CidrBlock" not in entry:  # no CidrBlock: an IPv6 rule
            continue
        rule_network = ipaddress.ip_network(entry["CidrBlock"])
        rule_ports = entry.get("PortRange")
        rule_low, rule_high = (rule_ports["From"], rule_ports["To"]) if rule_ports and entry["Protocol"] == "6" \
            else (0, 65535)
        overlaps = rule_network.overlaps(flow) and rule_low <= high and low <= rule_high
        covers = _contains(str(rule_network), flow) and rule_low <= low and high <= rule_high
        if entry["RuleAction"] == "deny" and overlaps:
            return False, entry["RuleNumber"]
        if entry["RuleAction"] == "allow" and covers:
            return True, entry["RuleNumber"]
    return False, None


def free_rule_number(acl: dict, egress: bool) -> int:
    """A rule number before any deny (so the new allow wins), not yet used."""
    used = {entry["RuleNumber"] for entry in acl.get("Entries", []) if entry.get("Egress") == egress}
    denies = [entry["RuleNumber"] for entry in acl.get("Entries", [])
              if entry.get("Egress") == egress and entry["RuleAction"] == "deny" and entry["RuleNumber"] < 32767]
    candidate = max(1, min(denies, default=100) - 1)
    while candidate in used and candidate > 1:
        candidate -= 1
    return candidate


def _covers_port(permission: dict, port: int) -> bool:
    return _covers_ports(permission, port, port)


def _covers_ports(permission: dict, low: int, high: int) -> bool:
    if permission.get("IpProtocol") == "-1":
        return True
    return permission.get("IpProtocol") == "tcp" and permission.get("FromPort", 0) <= low \
        and high <= permission.get("ToPort", -1)


def _contains(rule_cidr: str, network: ipaddress.IPv4Network) -> bool:
    rule = ipaddress.ip_network(rule_cidr, strict=False)
    return rule.version == network.version and network.subnet_of(rule)


def aws(*arguments: str) -> str:
    return shlex.join(["aws", *arguments])
