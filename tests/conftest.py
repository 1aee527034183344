import sys
from pathlib import Path

# tests/ holds shared helpers (lab_session.py) next to the test folders.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "unit"))
