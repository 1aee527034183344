import pytest

from lab_session import LabSession, require_lab_support


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A 3-host lab for the module, torn down afterwards whatever happened."""
    require_lab_support()
    session = LabSession.up(tmp_path_factory.mktemp("lab"), 3)
    try:
        yield session
    finally:
        session.down()
