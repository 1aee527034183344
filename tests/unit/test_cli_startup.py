"""The CLIs start fast: --help imports none of pulumi, pulumi_aws, boto3, pyinfra, paramiko, gevent or ray."""

import subprocess
import sys

import pytest

HEAVY = ("pulumi", "pulumi_aws", "boto3", "botocore", "pyinfra", "paramiko", "gevent", "ray")

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


@pytest.mark.parametrize("module", ["flambe_iac.cli.deploy", "flambe_iac.cli.lab"])
def test_help_loads_no_heavy_module(module):
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY)],
                            capture_output=True, text=True, check=True)
    assert "LOADED []" in result.stderr
    assert "usage:" in result.stdout


def test_deploy_help_teaches_the_sources_trust_and_exit_codes():
    result = subprocess.run([sys.executable, "-m", "flambe_iac.cli.deploy", "--help"], capture_output=True,
                            text=True, check=True)
    for text in ("--outputs", "--stack", "--cluster", "--known-hosts", "--trust-on-first-use", "orchestrator_ip",
                 "exit codes", "FLAMBE_KEY_PASSPHRASE", "--rotate-cluster-key"):
        assert text in result.stdout


def test_deploy_needs_exactly_one_cluster_source():
    result = subprocess.run([sys.executable, "-m", "flambe_iac.cli.deploy", "--key", "k"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "one of the arguments --outputs --stack --cluster is required" in result.stderr


WITHOUT_PULUMI = """
import sys

class NoPulumi:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pulumi", "pulumi_aws"):
            raise ImportError(f"{name} is not installed (deploy-only install)")

sys.meta_path.insert(0, NoPulumi())
from gevent import monkey
monkey.patch_all()
import flambe_iac.cli.deploy, flambe_iac.cli.check, flambe_iac.engine.driver, flambe_iac.cli.lab, flambe_iac.cli.run
import flambe_iac.deploys.steps, flambe_iac.ssh.console_pins, flambe_iac.aws.preflight, flambe_iac.aws.client
print("deploy side imported")
"""


def test_the_deploy_side_needs_no_pulumi():
    """pulumi and pulumi-aws are the `stack` extra: flambe-deploy, check and the lab import without them."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_PULUMI], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "deploy side imported" in result.stdout


def test_pulumi_is_only_an_extra():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert not [item for item in project["dependencies"] if item.lower().startswith("pulumi")]
    assert {item.split("==")[0] for item in project["optional-dependencies"]["stack"]} == {"pulumi", "pulumi-aws"}


def test_the_ci_example_pins_pulumi_and_never_trusts_on_first_use():
    from pathlib import Path

    import yaml

    text = (Path(__file__).parents[2] / "examples" / "github-actions-deploy.yml").read_text()
    workflow = yaml.safe_load(text)
    steps = workflow["jobs"]["cluster"]["steps"]
    pulumi = next(step for step in steps if step.get("uses", "").startswith("pulumi/actions@"))
    assert pulumi["uses"].startswith("pulumi/actions@8e5e406f") and pulumi["with"]["pulumi-version"]
    assert "concurrency" in workflow
    commands = "\n".join(step.get("run", "") for step in steps)
    assert "--trust-on-first-use" not in commands and "curl" not in commands
    assert "ec2:GetConsoleOutput" in text and "PULUMI_CONFIG_PASSPHRASE" in text
    versions = [line.split("  # v", 1)[1] for line in text.splitlines() if "uses: actions/" in line]
    assert len(versions) == 3 and all(int(version.split(".")[0]) >= 7 for version in versions)
