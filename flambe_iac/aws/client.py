"""Every boto3 call's entry: one EC2 client, and AWS's credential and permission errors mapped once to words.

Credentials come only from boto3's default chain (environment, ~/.aws, SSO, instance role); nothing here asks
for keys. boto3 is imported inside the functions, to keep start-up fast.
"""

from __future__ import annotations

from contextlib import contextmanager

from flambe_iac.errors import InputError

REFUSED_CREDENTIALS = ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "ExpiredToken",
                       "AccessDenied", "RequestExpired")


def ec2_client(region: str | None):
    import boto3
    from botocore.exceptions import InvalidRegionError, NoRegionError

    try:
        return boto3.client("ec2", region_name=region)
    except NoRegionError:
        raise InputError("no AWS region: pass --region, set aws:region in the stack, or AWS_DEFAULT_REGION") from None
    except (InvalidRegionError, ValueError):  # botocore's message would echo the name: ours is escaped where shown
        raise InputError(f"{region!r} is not an AWS region (like us-east-1): check --region or aws:region") from None


def service_client(service: str, region: str | None = None):
    """A boto3 client of SERVICE (s3, iam), with the default chain's credentials and region."""
    import boto3

    return boto3.client(service, region_name=region)


@contextmanager
def aws_errors(doing: str, otherwise: str = ""):
    """Map AWS's credential and permission errors, raised while DOING, to an InputError that says what to do.
    OTHERWISE is appended: what the user can do instead of using AWS."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    instead = f"; {otherwise}" if otherwise else ""
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise InputError(f"no AWS credentials for {doing}: configure them as for the aws CLI (aws configure, "
                         f"aws sso login, AWS_PROFILE, or an instance role){instead}") from None
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in REFUSED_CREDENTIALS:
            raise InputError(f"AWS refused {doing} ({code}): refresh the credentials or grant the permission"
                             f"{instead}") from None
        raise
