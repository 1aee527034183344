"""The runnable file: an optional first YAML document of extensions, then `---`, then the runnable.

    my_extension: git@github.com:me/my-extension.git@v1.0
    ---
    runnable: my_extension.train:Train
    args: {epochs: 3}
    resources: {data: ./data}

Read with a safe loader only. Errors name the document and the key.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flambe_iac.errors import InputError
from flambe_iac.inputs.extensions import ExtensionLocation, parse_location
from flambe_iac.inputs.s3_location import is_s3_location

RUNNABLE_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
RUNNABLE_KEYS = {"runnable", "args", "resources"}


@dataclass(frozen=True)
class RunnableFile:
    path: Path
    extensions: dict[str, ExtensionLocation]
    runnable: str
    args: dict[str, Any]
    resources: dict[str, Path | str]  # a local path, or an s3://BUCKET/PREFIX the hosts pull


def load_runnable_file(path: Path) -> RunnableFile:
    path = Path(path)
    try:
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read runnable file {path}: {getattr(error, 'strerror', None) or 'not UTF-8'}") \
            from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise InputError(f"runnable file {path}{where}: {problem} (only plain YAML, no Python tags)") from None
    except (RecursionError, ValueError, TypeError):
        raise InputError(f"runnable file {path}: nested too deep, or keys no mapping can hold") from None
    if len(documents) not in (1, 2):
        raise InputError(f"runnable file {path} has {len(documents)} documents: give the runnable, "
                         "optionally after a first document of extensions and a `---` line")
    *extension_documents, runnable_document = documents
    base = path.resolve().parent
    extensions = _extensions(extension_documents[0], path, base) if extension_documents else {}
    where = f"runnable file {path}, document {len(documents)} (the runnable)"
    if not isinstance(runnable_document, dict):
        raise InputError(f"{where}: expected keys runnable, args, resources")
    unknown = sorted(set(runnable_document) - RUNNABLE_KEYS, key=str)
    if unknown:
        raise InputError(f"{where}, key {unknown[0]!r}: unknown (known: {', '.join(sorted(RUNNABLE_KEYS))})")
    spec = runnable_document.get("runnable")
    if not isinstance(spec, str) or not RUNNABLE_SPEC.fullmatch(spec):
        raise InputError(f"{where}, key 'runnable': give package.module:ClassName, not {spec!r}")
    args = runnable_document.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
        raise InputError(f"{where}, key 'args': give a mapping of argument names to values")
    resources = runnable_document.get("resources") or {}
    if not isinstance(resources, dict) or not all(isinstance(value, str) for value in resources.values()):
        raise InputError(f"{where}, key 'resources': give a mapping of names to local paths or s3:// prefixes")
    return RunnableFile(path, extensions, spec, args,
                        {str(name): value if is_s3_location(value) else (base / Path(value).expanduser()).resolve()
                         for name, value in resources.items()})


def _extensions(document: Any, path: Path, base: Path) -> dict[str, ExtensionLocation]:
    where = f"runnable file {path}, document 1 (the extensions)"
    if not isinstance(document, dict):
        raise InputError(f"{where}: expected a mapping of extension names to locations")
    locations = {}
    for name, text in document.items():
        try:
            locations[str(name)] = parse_location(str(name), text, base)
        except InputError as error:
            raise InputError(f"{where}, key {str(name)!r}: {error}") from None
    return locations


def import_paths(checkouts: list) -> list[Path]:
    """Where the extensions' code is importable from without installing them: each checkout's directory."""
    return [checkout.directory for checkout in checkouts if checkout.directory is not None]


def check_runnable_class(spec: str, paths: list[Path]) -> None:
    """That `package.module:ClassName` names a class defined in a module found in PATHS or installed here.

    It reads the module's source instead of importing it: nothing of the user's code runs, and its heavy
    dependencies need not be installed on this machine.
    """

    module_name, _, class_name = spec.partition(":")
    relative = Path(*module_name.split("."))
    candidates = [path / relative.with_suffix(".py") for path in paths]
    candidates += [path / relative / "__init__.py" for path in paths]
    source_file = next((candidate for candidate in candidates if candidate.is_file()), None)
    if source_file is None:
        try:
            found = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise InputError(f"runnable {spec!r}: no module {module_name!r} in the extensions or installed here")
        source_file = Path(found.origin)
    try:
        tree = ast.parse(source_file.read_text(encoding="utf-8"), filename=str(source_file))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as error:
        raise InputError(f"runnable {spec!r}: cannot read {source_file} ({type(error).__name__})") from None
    if not any(isinstance(node, ast.ClassDef) and node.name == class_name for node in tree.body):
        raise InputError(f"runnable {spec!r}: {source_file} defines no class {class_name!r}")
