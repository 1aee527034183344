"""`check` for S3 resources: the stack's instance profile exists, its role may read each prefix, and it may not
write, delete or read beyond what it needs. Read-only: IAM's GetInstanceProfile and SimulatePrincipalPolicy, which
evaluates the role's own policies as AWS would (we never create or change IAM)."""

from __future__ import annotations

from flambe_iac.aws.client import aws_errors
from flambe_iac.aws.preflight import FAIL, PASS, Finding
from flambe_iac.inputs.s3_location import S3Resource

WARN = "WARN"
NEEDED = "s3:GetObject"  # a host fetches each listed object by its key (with If-Match); it never lists
TOO_MUCH = ("s3:PutObject", "s3:DeleteObject")
ELSEWHERE = "arn:aws:s3:::flambe-check-some-other-bucket/any-key"  # a bucket the role has no reason to read


def role_of_profile(iam, profile: str) -> tuple[str | None, Finding | None]:
    """(the role's ARN, None), or (None, the FAIL that says why there is none)."""
    check = f"instance profile {profile}"
    with aws_errors("reading the instance profile (iam:GetInstanceProfile)"):
        try:
            roles = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"].get("Roles", [])
        except iam.exceptions.NoSuchEntityException:
            return None, Finding(FAIL, check, "does not exist: create it (with a role that may read the prefixes) "
                                              "and name it in flambe:iamInstanceProfile")
    if not roles:
        return None, Finding(FAIL, check, "holds no role: add one with `aws iam add-role-to-instance-profile`")
    return roles[0]["Arn"], None


def check_s3_access(iam, profile: str | None, resources: list[S3Resource]) -> list[Finding]:
    if not resources:
        return []
    if not profile:
        return [Finding(FAIL, "instance profile", "the stack names none (flambe:iamInstanceProfile), so the hosts "
                                                  "have no role to read S3 with: give one")]
    role, failure = role_of_profile(iam, profile)
    if failure is not None:
        return [failure]
    findings = []
    for resource in resources:
        objects = f"arn:aws:s3:::{resource.bucket}/{resource.prefix}*"
        allowed, where = simulated(iam, role, NEEDED, objects)
        findings.append(Finding(PASS, f"role reads {resource.url}", f"the role's own policies allow {NEEDED} ({where}; "
                                "a bucket or KMS key policy may still refuse it)") if allowed else
                        Finding(FAIL, f"role reads {resource.url}", f"{NEEDED} is not allowed to {role}",
                                (minimal_policy(resource),)))
        for action in TOO_MUCH:
            allowed, where = simulated(iam, role, action, objects)
            if allowed:
                findings.append(Finding(WARN, f"role writes {resource.url}",
                                        f"{action} is allowed ({where}): the hosts need only {NEEDED}"))
    allowed, where = simulated(iam, role, NEEDED, ELSEWHERE)
    if allowed:
        findings.append(Finding(WARN, "role reads any bucket", f"{NEEDED} is allowed on a bucket it was not given "
                                                               f"({where}): narrow its Resource to the prefixes"))
    return findings


def simulated(iam, role: str, action: str, resource: str) -> tuple[bool, str]:
    """Whether the role's policies allow ACTION on RESOURCE, and the statements that decided it, in words."""
    with aws_errors(f"simulating the role's policy (iam:SimulatePrincipalPolicy, {action})"):
        results = iam.simulate_principal_policy(PolicySourceArn=role, ActionNames=[action],
                                                ResourceArns=[resource])["EvaluationResults"]
    result = results[0] if results else {}
    statements = [f"{statement.get('SourcePolicyId', '?')} line "
                  f"{statement.get('StartPosition', {}).get('Line', '?')}"
                  for statement in result.get("MatchedStatements", [])]
    return result.get("EvalDecision") == "allowed", "; ".join(statements) or "no statement matched"


def minimal_policy(resource: S3Resource) -> str:
    return ('attach to the role: {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": '
            f'"{NEEDED}", "Resource": "arn:aws:s3:::{resource.bucket}/{resource.prefix}*"}}]}}')
