"""The code keeps one home for each concern: these fail when a change puts a concern somewhere else."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
POLICY = ROOT / "flambe_iac" / "ssh" / "policy.py"
HEAVY = {"pulumi", "pulumi_aws", "boto3", "botocore", "pyinfra", "paramiko", "gevent", "greenlet", "ray",
         "cryptography"}


def product_modules() -> list[Path]:
    return sorted([*ROOT.glob("flambe_iac/**/*.py"), *ROOT.glob("deploys/*.py"), *ROOT.glob("stacks/*.py")])


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def shown(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


@pytest.mark.parametrize("literal", ["StrictHostKeyChecking", "IdentitiesOnly", "IdentityAgent", "ForwardAgent"])
def test_ssh_options_are_written_only_in_the_policy_module(literal):
    holders = [path.relative_to(ROOT) for path in product_modules() if literal in path.read_text()]
    assert holders == [POLICY.relative_to(ROOT)]


def test_every_ssh_and_rsync_argv_is_formed_in_the_policy_module():
    """A list or tuple that starts with "ssh" or "rsync" and goes on with options is a command line: only the policy
    forms one."""
    formed = []
    for path in product_modules():
        if path == POLICY:
            continue
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.List, ast.Tuple)) and node.elts and isinstance(node.elts[0], ast.Constant) \
                    and node.elts[0].value in ("ssh", "rsync", "scp", "sftp") and any(
                        isinstance(element, ast.Starred) or isinstance(element, ast.Constant)
                        and str(element.value).startswith("-") for element in node.elts[1:]):
                formed.append(shown(path, node))
    assert formed == []


def test_boto3_is_used_only_under_the_aws_package():
    users = []
    for path in product_modules():
        for node in ast.walk(parsed(path)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] in ("boto3", "botocore") for name in names):
                users.append(path.relative_to(ROOT))
    assert users and all(path.parts[:2] == ("flambe_iac", "aws") for path in users), users


# Light modules imported late on purpose: the driver loads pyinfra, paramiko and gevent; `flambe_iac.Runnable` is
# resolved on first use, so `import flambe_iac` loads nothing; the runner imports itself through the package; the
# autostop agent's install, run on every member by the deploy, does not load the agent's loop; the pyinfra connector
# (ssh/connector.py) is pyinfra's, set on hosts only once a deploy runs; S3's listing, only for an S3 resource.
LATE_ON_PURPOSE = {"flambe_iac.engine.driver", "flambe_iac.runnable", "flambe_iac.agent.watch",
                   "flambe_iac.ssh.connector", "flambe_iac.aws.s3_listing", "flambe_iac.aws.s3_staging",
                   "flambe_iac.deploys.steps"}


def test_imports_inside_functions_are_only_the_heavy_ones():
    """Everything light is imported at the top; pulumi, boto3, pyinfra, paramiko, gevent and Ray stay off the
    CLI's start-up path (tests/unit/test_cli_startup.py), and so may wait until a function needs them."""
    light = []
    for path in product_modules():
        tree = parsed(path)
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in top:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if module.split(".")[0] not in HEAVY and module not in LATE_ON_PURPOSE:
                    light.append(f"{shown(path, node)} {module}")
    assert light == []


def test_no_module_over_450_lines_and_no_class_over_120():
    big = []
    for path in product_modules():
        lines = path.read_text().count("\n")
        if lines > 450:
            big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 120:
                big.append(f"{shown(path, node)} class {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert big == []


def test_the_driver_only_orders_phases():
    assert (ROOT / "flambe_iac" / "engine" / "driver.py").read_text().count("\n") <= 100


def test_every_subpackage_says_what_it_holds():
    for init in ROOT.glob("flambe_iac/*/__init__.py"):
        docstring = ast.get_docstring(parsed(init))
        assert docstring and "\n" not in docstring.strip(), init


def test_the_deploy_cli_chooses_no_parser_by_hand():
    """One argparse tree: nothing reads argv itself to pick among parsers."""
    source = (ROOT / "flambe_iac" / "cli" / "deploy.py").read_text()
    assert "argv[0]" not in source and "argv[:1]" not in source


def test_no_two_test_modules_share_a_name():
    """pytest imports tests/unit and tests/lab as top-level modules: two files of one name stop the whole run at
    collection (a CI run stopped so: tests/lab and tests/unit each had a test_s3_resources.py)."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
