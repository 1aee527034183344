"""The CI example passes the linters its ecosystem uses, run offline: actionlint (deprecated runtimes, expressions,
syntax) and zizmor (unpinned actions, persisted credentials, template injection)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "github-actions-deploy.yml"
BIN = Path(sys.executable).parent


def lint(tool: str, workflow: Path) -> subprocess.CompletedProcess:
    argv = {"actionlint": [str(BIN / "actionlint"), "-no-color", str(workflow)],
            "zizmor": [str(BIN / "zizmor"), "--offline", "--no-progress", str(workflow)]}[tool]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("tool", ["actionlint", "zizmor"])
def test_the_example_has_no_finding(tool):
    result = lint(tool, EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("tool, regression, expected", [
    ("actionlint", ("@e6de054238d6b7531b4efff3b6587d9aade6a06c  # v6.2.3", "@v5"), 'runtime "node20" is deprecated'),
    ("zizmor", ("@3d3c42e5aac5ba805825da76410c181273ba90b1  # v7.0.1", "@v7"), "unpinned-uses"),
    ("zizmor", ("        with:\n          persist-credentials: false\n", ""), "artipacked"),
    ("actionlint", ("inputs.action || 'up'", "inputs.acton || 'up'"), "property \"acton\" is not defined"),
])
def test_the_linters_catch_what_the_example_was_fixed_for(tmp_path, tool, regression, expected):
    old, new = regression
    text = EXAMPLE.read_text()
    assert old in text
    regressed = tmp_path / ".github" / "workflows" / "flambe-cluster.yml"
    regressed.parent.mkdir(parents=True)
    regressed.write_text(text.replace(old, new, 1))
    result = lint(tool, regressed)
    assert result.returncode != 0 and expected in result.stdout + result.stderr


def test_every_action_is_pinned_to_a_full_commit_with_its_version():
    uses = [line.split("uses: ", 1)[1] for line in EXAMPLE.read_text().splitlines() if "uses: " in line]
    assert len(uses) == 7
    for reference in uses:
        action, rest = reference.split("@", 1)
        sha, comment = rest.split("  # ", 1)
        assert len(sha) == 40 and all(digit in "0123456789abcdef" for digit in sha), reference
        assert comment.startswith("v"), reference


def test_one_run_at_a_time_per_stack_whatever_the_branch():
    """Two branches' runs of one stack would fight over its state, and each leftovers check would list the other's
    new instances with a terminate line."""
    workflow = yaml.safe_load(EXAMPLE.read_text())
    group = workflow["concurrency"]["group"]
    assert "github." not in group and group.endswith(f"-{workflow['env']['STACK']}")
    assert workflow["concurrency"]["cancel-in-progress"] is False


def test_a_scheduled_reconcile_runs_the_same_up_then_deploy_and_never_brings_back_a_destroyed_cluster():
    workflow = yaml.safe_load(EXAMPLE.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert [entry["cron"] for entry in triggers["schedule"]] == ["23 */6 * * *"]
    assert workflow["env"]["ACTION"] == "${{ inputs.action || 'up' }}"  # a schedule has no inputs: up, never destroy
    steps = workflow["jobs"]["cluster"]["steps"]
    commands = [step.get("with", {}).get("command") for step in steps]
    existing, up = steps[commands.index("output")], steps[commands.index("up")]
    assert existing["if"] == "github.event_name == 'schedule'" and existing["id"] == "existing"
    assert up["with"]["refresh"] is True  # pulumi up --refresh: a member EC2 took away is created again
    assert up["if"] == ("env.ACTION == 'up' && (github.event_name != 'schedule' "
                        "|| (steps.existing.outputs.cluster_name != '' && steps.last.outputs.destroyed == 'false'))")
    deploy = next(step for step in steps if step.get("name") == "flambe-deploy")
    assert steps.index(deploy) > steps.index(up) and deploy["if"] == "steps.up.outcome == 'success'"
    assert "--keep-cluster-key" not in deploy["run"]  # members that left rotate the key
    assert workflow["concurrency"]["cancel-in-progress"] is False  # a reconcile waits for a run under way


@pytest.mark.parametrize("history, destroyed", [
    ('[{"version": 7, "kind": "destroy", "result": "failed"}, {"version": 6, "kind": "update"}]', "true"),
    ('[{"version": 8, "kind": "destroy", "result": "in-progress"}]', "true"),  # cancelled: the runner was stopped
    ('[{"version": 9, "kind": "update", "result": "succeeded"}, {"version": 8, "kind": "destroy"}]', "false"),
])
def test_a_reconcile_after_a_destroy_that_failed_part_way_brings_nothing_back(tmp_path, history, destroyed):
    """A destroy that failed or was cancelled leaves the stack's outputs (Pulumi deletes the stack's own resource,
    which holds them, last): the outputs alone would let `up --refresh` create again what the destroy took down."""
    workflow = yaml.safe_load(EXAMPLE.read_text())
    steps = workflow["jobs"]["cluster"]["steps"]
    last = next(step for step in steps if step.get("id") == "last")
    up = next(step for step in steps if step.get("id") == "up")
    assert steps.index(last) < steps.index(up)
    assert last["if"] == "github.event_name == 'schedule' && steps.existing.outputs.cluster_name != ''"
    assert "steps.last.outputs.destroyed == 'false'" in up["if"]
    fake = tmp_path / "bin" / "pulumi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n[ \"$1 $2 $3\" = 'stack history --json' ] || exit 3\ncat <<'EOF'\n{history}\nEOF\n")
    fake.chmod(0o755)
    outputs = tmp_path / "github_output"
    result = subprocess.run(["bash", "-e", "-c", last["run"]], capture_output=True, text=True, timeout=30,
                            env={"PATH": f"{fake.parent}:/usr/bin:/bin", "STACK": "dev",
                                 "GITHUB_OUTPUT": str(outputs)})
    assert result.returncode == 0, result.stderr
    assert outputs.read_text() == f"destroyed={destroyed}\n"


def test_a_reconcile_that_cannot_read_the_stacks_history_stops_there(tmp_path):
    steps = yaml.safe_load(EXAMPLE.read_text())["jobs"]["cluster"]["steps"]
    last = next(step for step in steps if step.get("id") == "last")
    fake = tmp_path / "bin" / "pulumi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'error: could not reach the backend' >&2\nexit 255\n")
    fake.chmod(0o755)
    outputs = tmp_path / "github_output"
    outputs.write_text("")
    result = subprocess.run(["bash", "-e", "-c", last["run"]], capture_output=True, text=True, timeout=30,
                            env={"PATH": f"{fake.parent}:/usr/bin:/bin", "STACK": "dev",
                                 "GITHUB_OUTPUT": str(outputs)})
    assert result.returncode != 0 and outputs.read_text() == ""  # a failed step: the up after it does not run
