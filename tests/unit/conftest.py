"""Fixtures of the unit tests that run against moto's AWS."""

import boto3
import moto
import pytest
from moto import mock_aws
from pulumi_harness import moto_network


@pytest.fixture
def ec2(monkeypatch):
    """moto's EC2 with fake credentials."""
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(variable, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield boto3.client("ec2", region_name="us-east-1")


@pytest.fixture
def aws(monkeypatch):
    """moto's EC2 with its optional validations on (AMI, key pair, instance type), and fake credentials."""
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(variable, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(moto.settings, "ENABLE_AMI_VALIDATION", True)
    monkeypatch.setattr(moto.settings, "ENABLE_KEYPAIR_VALIDATION", True)
    monkeypatch.setattr(moto.settings, "EC2_ENABLE_INSTANCE_TYPE_VALIDATION", True)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        yield ec2, moto_network(ec2)
