import sys
from pathlib import Path

# tests/ holds shared helpers (lab_session.py) next to the test folders.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "unit"))


def pytest_sessionfinish(session, exitstatus):
    if "pulumi_harness" in sys.modules:
        sys.modules["pulumi_harness"].close_stray_event_loops()
