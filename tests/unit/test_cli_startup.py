"""The CLIs start fast: --help imports none of pulumi, pulumi_aws, boto3, pyinfra, paramiko or gevent."""

import subprocess
import sys

import pytest

HEAVY = ("pulumi", "pulumi_aws", "boto3", "botocore", "pyinfra", "paramiko", "gevent")

PROBE = """
import sys
from {module} import main
try:
    main(["--help"])
except SystemExit as exit:
    assert exit.code == 0
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set({heavy!r}))
print("LOADED", loaded, file=sys.stderr)
"""


@pytest.mark.parametrize("module", ["flambe_iac.deploy_cli", "flambe_iac.lab"])
def test_help_loads_no_heavy_module(module):
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY)],
                            capture_output=True, text=True, check=True)
    assert "LOADED []" in result.stderr
    assert "usage:" in result.stdout


def test_deploy_help_teaches_the_sources_trust_and_exit_codes():
    result = subprocess.run([sys.executable, "-m", "flambe_iac.deploy_cli", "--help"], capture_output=True,
                            text=True, check=True)
    for text in ("--outputs", "--stack", "--cluster", "--known-hosts", "--trust-on-first-use", "orchestrator_ip",
                 "exit codes", "FLAMBE_KEY_PASSPHRASE", "--rotate-cluster-key"):
        assert text in result.stdout


def test_deploy_needs_exactly_one_cluster_source():
    result = subprocess.run([sys.executable, "-m", "flambe_iac.deploy_cli", "--key", "k"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "one of the arguments --outputs --stack --cluster is required" in result.stderr
