"""The CLIs start fast: --help imports none of pulumi, pulumi_aws, boto3, pyinfra, paramiko, gevent or ray; and
flambe-deploy imports a command's module only when that command runs."""

import json
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


OTHER_COMMANDS_MODULES = ("flambe_iac.cli.check", "flambe_iac.cli.day_two", "flambe_iac.day_two",
                          "flambe_iac.aws.capacity", "flambe_iac.aws.leftovers")

LOADED_BY = """
import json
import sys
from flambe_iac.cli.deploy import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
loaded = sorted(name for name in sys.modules if name.startswith({modules!r}))
print("EXIT", code, "LOADED", json.dumps(loaded), file=sys.stderr)
"""


def modules_loaded_by(argv: list[str], modules: tuple[str, ...]) -> tuple[int, list[str]]:
    """Run flambe-deploy ARGV in a fresh Python; its exit code and which of MODULES (or their submodules) it loaded."""
    result = subprocess.run([sys.executable, "-c", LOADED_BY.format(argv=argv, modules=modules)],
                            capture_output=True, text=True, check=True)
    line = next(line for line in result.stderr.splitlines() if line.startswith("EXIT "))
    code, loaded = line.removeprefix("EXIT ").split(" LOADED ")
    return int(code), json.loads(loaded)


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["deploy", "--help"],
                                  ["--outputs", "/nonexistent/outputs.json", "--key", "k"]])
def test_a_deploy_loads_neither_check_nor_the_day_two_commands(argv):
    """A deploy (the last: it runs as far as reading its inputs, with pyinfra and the driver loaded) pays for no
    command it does not run."""
    code, loaded = modules_loaded_by(argv, OTHER_COMMANDS_MODULES)
    assert code in (0, 2)
    assert loaded == []


@pytest.mark.parametrize("command, module, other", [
    ("check", "flambe_iac.cli.check", "flambe_iac.cli.day_two"),
    *[(name, "flambe_iac.cli.day_two", "flambe_iac.cli.check") for name in ("ssh-config", "exec", "download",
                                                                           "status")]])
def test_each_command_loads_its_own_module_and_only_that(command, module, other):
    code, loaded = modules_loaded_by([command, "--help"], (module, other))
    assert code == 0
    assert loaded == [module]


OWN_FLAGS = {"check": "--leftovers", "ssh-config": "--write", "exec": "-- CMD ...", "download": "--remote PATH",
             "status": "the same, as JSON"}


def test_every_command_is_listed_with_its_summary_and_has_its_own_whole_help():
    from flambe_iac.cli.deploy import OTHER_COMMANDS

    listing = subprocess.run([sys.executable, "-m", "flambe_iac.cli.deploy", "--help"], capture_output=True,
                             text=True, check=True).stdout
    assert set(OTHER_COMMANDS) == set(OWN_FLAGS)
    for name, (summary, _, _) in OTHER_COMMANDS.items():
        assert f"  {name:<12} {summary}\n" in listing
        own = subprocess.run([sys.executable, "-m", "flambe_iac.cli.deploy", name, "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert own.startswith(f"usage: flambe-deploy {name} [-h]")
        assert "--version" in own and OWN_FLAGS[name] in own
        assert [other for other, flag in OWN_FLAGS.items() if flag in own] == [name]
        if name != "check":  # every day-two command reaches the hosts through the shared source
            assert "cluster (exactly one):" in own and "--connect-timeout SECONDS" in own


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
