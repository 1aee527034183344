"""An extension package with a runnable that reports what it was given, and git repositories serving it."""

from __future__ import annotations

import subprocess
from pathlib import Path

RUNNABLE_SOURCE = '''
import json
import os
import time

from flambe_iac import Runnable


class WriteReport(Runnable):
    """Writes its args and every config value into its `out` resource, then sleeps if asked."""

    def __init__(self, message, sleep=0):
        self.message = message
        self.sleep = sleep

    def run(self):
        config = {section: dict(self.config[section]) for section in self.config.sections()}
        report = {"message": self.message, "config": config, "pid": os.getpid(), "marker": MARKER}
        (self.resources["out"] / "result.json").write_text(json.dumps(report))
        time.sleep(self.sleep)
'''


def write_extension(directory: Path, marker: str = "v1") -> Path:
    """A package `reportext` (with a pyproject, so pip can install it) under DIRECTORY."""
    package = directory / "reportext"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "runnables.py").write_text(RUNNABLE_SOURCE + f"\nMARKER = {marker!r}\n")
    (directory / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "reportext"\nversion = "0.1"\n\n[tool.setuptools]\npackages = ["reportext"]\n')
    return directory


def git(*arguments: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *arguments], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repository(directory: Path) -> dict[str, str]:
    """A repository whose main branch has the extension at its root in v1, a tag v1, and a v2 commit that also
    holds it under sub/; returns the commits."""
    directory.mkdir(parents=True)
    git("init", "--quiet", "--initial-branch=main", cwd=directory)
    git("config", "user.email", "test@example.invalid", cwd=directory)
    git("config", "user.name", "test", cwd=directory)
    write_extension(directory, "v1")
    git("add", ".", cwd=directory)
    git("commit", "--quiet", "-m", "v1", cwd=directory)
    git("tag", "v1", cwd=directory)
    v1 = git("rev-parse", "HEAD", cwd=directory)
    write_extension(directory, "v2")
    write_extension(directory / "sub", "v2-sub")
    git("add", ".", cwd=directory)
    git("commit", "--quiet", "-m", "v2", cwd=directory)
    return {"v1": v1, "v2": git("rev-parse", "HEAD", cwd=directory)}


def bare_clone(repository: Path, destination: Path) -> Path:
    """A bare copy that a dumb HTTP server or sshd can serve."""
    git("clone", "--quiet", "--bare", str(repository), str(destination))
    git("update-server-info", cwd=destination)
    return destination


def runnable_yaml(path: Path, extension_location: str, out: Path, message: str = "hello", sleep: float = 0,
                  runnable: str = "reportext.runnables:WriteReport") -> Path:
    path.write_text(f"reportext: {extension_location}\n---\nrunnable: {runnable}\n"
                    f"args: {{message: {message}, sleep: {sleep}}}\nresources: {{out: {out}}}\n")
    return path
