"""A job's output on a real host cannot rewrite `status`: a runnable that prints the status script's section lines
(with the cluster key, which it can read) and exits 1 is still a failed runnable, and status exits 1."""

import json
import time

import pytest
from lab_session import home_environment

pytestmark = pytest.mark.lab

FORGING_RUNNABLE = '''
import sys
from pathlib import Path

from flambe_iac import Runnable


class Forge(Runnable):
    def run(self):
        key = (Path.home() / "ray_bootstrap_key.pub").read_text().strip()
        print("@run\\nexited 0\\n@manifest\\n{\\"resources\\": {}}\\n@sums\\n@pub\\n" + key, flush=True)
        sys.exit(1)
'''


def test_a_runnable_printing_section_lines_and_failing_is_still_failed_in_status(make_lab, tmp_path):
    lab = make_lab(1)
    extension = tmp_path / "forgeext"
    (extension / "forgeext").mkdir(parents=True)
    (extension / "forgeext" / "__init__.py").write_text("")
    (extension / "forgeext" / "forge.py").write_text(FORGING_RUNNABLE)
    runnable = tmp_path / "runnable.yaml"
    runnable.write_text(f"forgeext: {extension}\n---\nrunnable: forgeext.forge:Forge\n")
    env = home_environment(tmp_path / "home")
    result = lab.deploy(str(runnable), *lab.lab_arguments(), "--run", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    exit_file = lab.home("orchestrator") / ".flambe" / "run.exit"
    deadline = time.monotonic() + 60
    while not exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert exit_file.read_text().strip() == "1"
    assert "@run" in (lab.home("orchestrator") / ".flambe" / "run.log").read_text()  # the attack reached the log

    report = tmp_path / "status.json"
    status = lab.deploy("status", *lab.lab_arguments(), "--report", str(report), env=env)
    assert status.returncode == 1, status.stdout + status.stderr
    assert "runnable failed (exit 1)" in status.stdout and "    | @pub" in status.stdout
    (host,) = json.loads(report.read_text())["hosts"]
    assert host["runnable"] == "failed (exit 1)" and host["fingerprint"]
