"""Imports run one way, from the top floor down: a module imports its own floor or a lower one, never a higher one
(at the top of the module or inside a function). The floors, top first, as docs/architecture.md states them:

5. flambe_iac.cli
4. flambe_iac.deploys, flambe_iac.day_two, flambe_iac.lab, flambe_iac.stacks
3. flambe_iac.engine
2. flambe_iac.inputs, flambe_iac.ssh, flambe_iac.aws, flambe_iac.agent, flambe_iac.runnable (the runner's library)
1. every other module of flambe_iac: errors, terminal, local_files, cluster, names, remote_layout, the package itself

The package's own __init__ is checked as an importer nowhere: its lazy `from flambe_iac import Runnable` is the
package's face to users' runnables, not a floor.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
FLOORS = {"cli": 5, "deploys": 4, "day_two": 4, "lab": 4, "stacks": 4, "engine": 3, "inputs": 2, "ssh": 2, "aws": 2,
          "agent": 2, "runnable": 2}


def floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "flambe_iac":
        return None
    return FLOORS.get(parts[1], 1) if len(parts) > 1 else 1


def product_modules(root: Path):
    """(module name, path) of every module, deploys/ and stacks/ under the names they install as."""
    for top, prefix in (("flambe_iac", ""), ("deploys", "flambe_iac."), ("stacks", "flambe_iac.")):
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            yield prefix + ".".join(parts).removesuffix(".__init__"), path


def upward_imports(root: Path) -> list[str]:
    found = []
    for module, path in product_modules(root):
        if module == "flambe_iac":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names
                                            if node.module == "flambe_iac"]
            else:
                continue
            for name in imported:
                here, there = floor(module), floor(name)
                if here is not None and there is not None and there > here:
                    found.append(f"{path.relative_to(root)}:{node.lineno} ({module}, floor {here}) imports {name} "
                                 f"(floor {there})")
    return found


def test_imports_run_one_way():
    assert upward_imports(ROOT) == []


def test_an_upward_import_is_found_at_the_top_and_inside_a_function(tmp_path):
    for path, text in {"flambe_iac/ssh/policy.py": "from flambe_iac.engine import fleet\n",
                       "flambe_iac/names.py": "def f():\n    import flambe_iac.inputs.plan\n",
                       "deploys/steps.py": "from flambe_iac.engine.steps import Step\n",
                       "flambe_iac/engine/driver.py": "from flambe_iac import deploys\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    found = upward_imports(tmp_path)
    assert [entry.split(" ", 1)[0] for entry in found] == ["flambe_iac/engine/driver.py:1", "flambe_iac/names.py:2",
                                                           "flambe_iac/ssh/policy.py:1"]
