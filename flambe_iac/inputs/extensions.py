"""Extensions: where each one comes from, and a local checkout of it made with the user's own git.

A location is one of:
  - a local path:            ./my_ext, /abs/path, ~/code/ext
  - a git URL:               https://host/org/repo.git, ssh://git@host/org/repo.git, git@host:org/repo.git
                             (a `git+` prefix is allowed), each with an optional `@ref` and `#subdirectory=path`
  - a PyPI requirement:      my-extension==1.2

git runs as the user runs it: their ssh-agent, ~/.ssh/config and credential helpers. Nothing is generated or sent
for it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flambe_iac.errors import InputError
from flambe_iac.names import check_tree_name

LOCAL, GIT, PYPI = "local", "git", "pypi"
SCP_LIKE = re.compile(r"^(?P<user>[A-Za-z0-9._-]+@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/][^:]*)$")
REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\s*((==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!_-]+\s*,?\s*)*$")
GIT_TIMEOUT = 300


@dataclass(frozen=True)
class ExtensionLocation:
    name: str
    kind: str
    text: str  # as the user wrote it
    path: Path | None = None  # LOCAL
    url: str | None = None  # GIT
    ref: str | None = None  # GIT, None for the remote's default branch
    subdirectory: str | None = None  # GIT
    requirement: str | None = None  # PYPI


@dataclass(frozen=True)
class Checkout:
    """An extension ready to push: a directory (without .git), and the exact commit for git ones."""

    location: ExtensionLocation
    directory: Path | None  # None for a PyPI requirement: nothing to push, only to install
    commit: str | None = None


def redact_url(text: str) -> str:
    """A location as it may be shown: a password or token in the URL becomes ***."""
    return re.sub(r"(://[^/@:]+):[^/@]+@", r"\1:***@", text)


def parse_location(name: str, text: str, base: Path) -> ExtensionLocation:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"extension {name!r}: its location must be a path, a git URL or a PyPI requirement")
    check_tree_name(name, "extension")
    text = text.strip()
    if _looks_like_git(text):
        return _git_location(name, text)
    path = Path(os.path.expanduser(text))
    path = path if path.is_absolute() else base / path
    if text.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise InputError(f"extension {name!r}: {redact_url(text)} is not a directory")
        return ExtensionLocation(name, LOCAL, text, path=path.resolve())
    if REQUIREMENT.fullmatch(text):
        return ExtensionLocation(name, PYPI, text, requirement=text)
    raise InputError(
        f"extension {name!r}: {redact_url(text)!r} is not an existing directory, a git URL (https://, ssh:// or "
        "git@host:org/repo.git, with optional @ref and #subdirectory=) or a PyPI requirement"
    )


def _looks_like_git(text: str) -> bool:
    return "://" in text or text.startswith("git+") or SCP_LIKE.match(text.split("#")[0]) is not None


def _git_location(name: str, text: str) -> ExtensionLocation:
    location, _, fragment = text.partition("#")
    subdirectory = None
    if fragment:
        key, _, value = fragment.partition("=")
        if key != "subdirectory" or not value or value.startswith("/") or ".." in value.split("/"):
            raise InputError(f"extension {name!r}: {redact_url(text)!r} has a fragment other than #subdirectory=relative/path")
        subdirectory = value.strip("/")
    location = location.removeprefix("git+")
    url, ref = _split_ref(location)
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http", "ssh", "git", "file") or not (parts.netloc or parts.scheme == "file") \
                or not parts.path.strip("/"):
            raise InputError(f"extension {name!r}: {redact_url(text)!r} is not a git URL git can fetch (https, ssh or file)")
    elif not SCP_LIKE.match(url):
        raise InputError(f"extension {name!r}: {redact_url(text)!r} is not a git URL (try git@host:org/repo.git)")
    return ExtensionLocation(name, GIT, text, url=url, ref=ref, subdirectory=subdirectory)


def _split_ref(location: str) -> tuple[str, str | None]:
    """`...repo.git@v1.2` → (`...repo.git`, `v1.2`): the ref is an `@` in the path, not in the host part."""
    if "://" in location:
        scheme, rest = location.split("://", 1)
        host, slash, path = rest.partition("/")
        prefix = f"{scheme}://{host}{slash}"
    else:
        host, colon, path = location.partition(":")
        prefix = f"{host}{colon}"
    if "@" not in path:
        return location, None
    path, _, ref = path.rpartition("@")
    if not re.fullmatch(r"[A-Za-z0-9._/+-]+", ref):
        raise InputError(f"{location!r}: {ref!r} is not a git ref")
    return prefix + path, ref


def checkout(location: ExtensionLocation, cache: Path) -> Checkout:
    """Make the extension's files available locally. Git failures are input errors: nothing is sent."""
    if location.kind == LOCAL:
        return Checkout(location, location.path)
    if location.kind == PYPI:
        return Checkout(location, None)
    repository = cache / hashlib.sha256(location.url.encode()).hexdigest()[:16]
    if not (repository / ".git").exists():
        repository.mkdir(parents=True, exist_ok=True)
        _git(location, ["init", "--quiet", str(repository)])
        _git(location, ["-C", str(repository), "remote", "add", "origin", location.url])
    _git(location, ["-C", str(repository), "fetch", "--quiet", "--tags", "--force", "origin",
                    "+refs/heads/*:refs/remotes/origin/*"])
    commit = _resolve(location, repository)
    _git(location, ["-C", str(repository), "checkout", "--quiet", "--force", "--detach", commit])
    _git(location, ["-C", str(repository), "clean", "--quiet", "-dffx"])
    directory = repository / location.subdirectory if location.subdirectory else repository
    if not directory.is_dir():
        raise InputError(f"extension {location.name!r}: {location.subdirectory!r} is not a directory at {commit[:12]}")
    inside = directory.resolve()
    if inside != repository.resolve() and repository.resolve() not in inside.parents:
        raise InputError(f"extension {location.name!r}: {location.subdirectory!r} leads out of the repository (a "
                         f"symlink?) at {commit[:12]}; only the repository's own files are sent")
    return Checkout(location, directory, commit)


def _resolve(location: ExtensionLocation, repository: Path) -> str:
    candidates = ([f"refs/remotes/origin/{location.ref}", f"refs/tags/{location.ref}", location.ref]
                  if location.ref else ["refs/remotes/origin/HEAD", "refs/remotes/origin/main",
                                        "refs/remotes/origin/master"])
    if not location.ref:
        subprocess.run(["git", "-C", str(repository), "remote", "set-head", "origin", "--auto"],
                       capture_output=True, timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL)
    for candidate in candidates:
        result = subprocess.run(["git", "-C", str(repository), "rev-parse", "--verify", "--quiet",
                                 f"{candidate}^{{commit}}"], capture_output=True, text=True, timeout=GIT_TIMEOUT)
        if result.returncode == 0:
            return result.stdout.strip()
    what = f"ref {location.ref!r}" if location.ref else "a default branch"
    raise InputError(f"extension {location.name!r}: {redact_url(location.url)} has no {what}")


def _git(location: ExtensionLocation, arguments: list[str]) -> None:
    # No GIT_TERMINAL_PROMPT=0: a user at a terminal may be asked for credentials, as with their own git.
    try:
        result = subprocess.run(["git", *arguments], capture_output=True, text=True, timeout=GIT_TIMEOUT,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise InputError("extensions from git need git: apt-get install git") from None
    except subprocess.TimeoutExpired:
        raise InputError(f"extension {location.name!r}: git did not finish within {GIT_TIMEOUT} s") from None
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise InputError(f"extension {location.name!r}: git could not fetch {redact_url(location.url)}: "
                         f"{redact_url(detail)}")
