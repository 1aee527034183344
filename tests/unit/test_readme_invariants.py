"""docs/security.md names every planted bug of scripts/mutants, verbatim, under its invariant."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SECURITY = ROOT / "docs" / "security.md"


def planted_bugs():
    loader = importlib.machinery.SourceFileLoader("mutants", str(ROOT / "scripts" / "mutants"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("mutants", loader))
    saved = sys.modules.get("mutants")
    sys.modules["mutants"] = module  # the dataclass decorator looks its module up while the file runs
    try:
        loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["mutants"]
        else:
            sys.modules["mutants"] = saved
    return module.MUTANTS


def test_the_invariant_list_names_every_planted_bug():
    section = SECURITY.read_text()
    mutants = planted_bugs()
    assert mutants, "scripts/mutants lists no planted bug"
    missing = [f"{mutant.name} ({mutant.invariant})" for mutant in mutants if mutant.name not in section]
    assert not missing, (f"{len(missing)} planted bug(s) of scripts/mutants not named in docs/security.md; add "
                         "each, verbatim, to its invariant's planted bugs:\n  " + "\n  ".join(missing))


def test_every_planted_bug_finds_its_text_exactly_once():
    """A change to the code that moves a planted bug's text stops the mutant run at that bug (and CI with it): say so
    here, in the unit tests, with the bug's name."""
    stale = []
    for mutant in planted_bugs():
        found = (ROOT / mutant.path).read_text().count(mutant.old)
        if found != 1:
            stale.append(f"{mutant.name} ({mutant.path}: found {found} times)")
    assert not stale, "planted bugs whose text is not in the code exactly once; update them:\n  " + "\n  ".join(stale)


def test_every_planted_bug_names_tests_that_exist():
    absent = [f"{mutant.name}: {test}" for mutant in planted_bugs() for test in mutant.tests
              if not (ROOT / test.split("::")[0]).is_file()]
    assert not absent, "planted bugs naming test files that do not exist:\n  " + "\n  ".join(absent)
