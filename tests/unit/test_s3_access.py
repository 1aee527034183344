"""`check --resource NAME=s3://...`: the instance profile and its role's access, through IAM's own policy
simulation; botocore's Stubber plays IAM (moto has no SimulatePrincipalPolicy) and refuses any other call."""

import datetime

import boto3
import pytest
from botocore.stub import ANY, Stubber

from flambe_iac.aws.preflight import FAIL, PASS
from flambe_iac.aws.s3_access import ELSEWHERE, WARN, check_s3_access
from flambe_iac.inputs.s3_location import parse_s3_resource

ROLE = "arn:aws:iam::123456789012:role/flambe-hosts"
NOW = datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc)
DATA = parse_s3_resource("data", "s3://my-datasets/imagenet")


@pytest.fixture
def iam():
    client = boto3.client("iam", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


def profile(stub, roles=True):
    role = {"Path": "/", "RoleName": "flambe-hosts", "RoleId": "AROAEXAMPLEEXAMPLE", "Arn": ROLE, "CreateDate": NOW}
    stub.add_response("get_instance_profile", {"InstanceProfile": {
        "Path": "/", "InstanceProfileName": "hosts", "InstanceProfileId": "AIPAEXAMPLEEXAMPLE",
        "Arn": "arn:aws:iam::123456789012:instance-profile/hosts", "CreateDate": NOW,
        "Roles": [role] if roles else []}}, {"InstanceProfileName": "hosts"})


def decision(stub, action, resource, allowed, policy="hosts-policy"):
    matched = [{"SourcePolicyId": policy, "SourcePolicyType": "IAM Policy",
                "StartPosition": {"Line": 3, "Column": 5}}] if allowed else []
    stub.add_response("simulate_principal_policy", {"EvaluationResults": [{
        "EvalActionName": action, "EvalResourceName": resource,
        "EvalDecision": "allowed" if allowed else "implicitDeny", "MatchedStatements": matched}]},
        {"PolicySourceArn": ROLE, "ActionNames": [action], "ResourceArns": [resource]})


PREFIX = "arn:aws:s3:::my-datasets/imagenet/*"


def test_a_role_that_reads_only_its_prefix_passes_without_a_warning(iam):
    client, stub = iam
    profile(stub)
    decision(stub, "s3:GetObject", PREFIX, True)
    decision(stub, "s3:PutObject", PREFIX, False)
    decision(stub, "s3:DeleteObject", PREFIX, False)
    decision(stub, "s3:GetObject", ELSEWHERE, False)
    findings = check_s3_access(client, "hosts", [DATA])
    assert [finding.status for finding in findings] == [PASS]
    assert "hosts-policy line 3" in findings[0].detail


def test_a_role_that_may_write_delete_or_read_any_bucket_is_warned_of_with_its_statement(iam):
    client, stub = iam
    profile(stub)
    decision(stub, "s3:GetObject", PREFIX, True)
    decision(stub, "s3:PutObject", PREFIX, True, "AmazonS3FullAccess")
    decision(stub, "s3:DeleteObject", PREFIX, True, "AmazonS3FullAccess")
    decision(stub, "s3:GetObject", ELSEWHERE, True, "AmazonS3FullAccess")
    findings = check_s3_access(client, "hosts", [DATA])
    assert [finding.status for finding in findings] == [PASS, WARN, WARN, WARN]
    assert all("AmazonS3FullAccess line 3" in finding.detail for finding in findings[1:])
    assert "s3:DeleteObject" in findings[2].detail and "any bucket" in findings[3].check


def test_a_role_refused_the_prefix_fails_with_the_policy_that_would_let_it(iam):
    client, stub = iam
    profile(stub)
    decision(stub, "s3:GetObject", PREFIX, False)
    decision(stub, "s3:PutObject", PREFIX, False)
    decision(stub, "s3:DeleteObject", PREFIX, False)
    decision(stub, "s3:GetObject", ELSEWHERE, False)
    findings = check_s3_access(client, "hosts", [DATA])
    assert findings[0].status == FAIL and ROLE in findings[0].detail
    assert '"Resource": "arn:aws:s3:::my-datasets/imagenet/*"' in findings[0].fixes[0]


def test_a_missing_or_empty_profile_fails_in_words_before_any_simulation(iam):
    client, stub = iam
    stub.add_client_error("get_instance_profile", service_error_code="NoSuchEntity", http_status_code=404,
                          expected_params={"InstanceProfileName": "hosts"})
    assert "does not exist" in check_s3_access(client, "hosts", [DATA])[0].detail
    profile(stub, roles=False)
    assert "holds no role" in check_s3_access(client, "hosts", [DATA])[0].detail
    no_profile = check_s3_access(client, None, [DATA])
    assert no_profile[0].status == FAIL and "flambe:iamInstanceProfile" in no_profile[0].detail


def test_no_s3_resource_asks_iam_nothing(iam):
    client, stub = iam
    assert check_s3_access(client, "hosts", []) == []


def test_refused_permissions_to_simulate_are_bad_input_in_words(iam):
    from flambe_iac.errors import InputError

    client, stub = iam
    profile(stub)
    stub.add_client_error("simulate_principal_policy", service_error_code="AccessDenied", http_status_code=403,
                          expected_params={"PolicySourceArn": ROLE, "ActionNames": ANY, "ResourceArns": ANY})
    with pytest.raises(InputError, match="SimulatePrincipalPolicy"):
        check_s3_access(client, "hosts", [DATA])
