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


@pytest.fixture
def fresh_lab(tmp_path):
    """A 3-host lab of this test's own, torn down afterwards."""
    require_lab_support()
    session = LabSession.up(tmp_path / "lab", 3)
    try:
        yield session
    finally:
        session.down()


@pytest.fixture
def make_lab(tmp_path):
    """make_lab(hosts, *up_arguments): labs of the test's own (with --fault, --uplink-mbit, ...), torn down after."""
    require_lab_support()
    made = []

    def make(hosts, *arguments):
        session = LabSession.up(tmp_path / f"lab{len(made)}", hosts, *arguments)
        made.append(session)
        return session

    yield make
    for session in made:
        session.down()


@pytest.fixture
def deploy_inputs(tmp_path):
    """A secrets file holding a canary value, and a resource directory."""
    secrets = tmp_path / "secrets.ini"
    secrets.write_bytes(CANARY_SECRETS)
    resource = tmp_path / "data"
    (resource / "nested").mkdir(parents=True)
    (resource / "train.csv").write_text("a,b\n1,2\n")
    (resource / "nested" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return {"secrets": secrets, "resource": resource, "home": tmp_path / "home"}


CANARY = "canary-Zq7f%Xk2-never-print-me"
CANARY_SECRETS = f"[DEFAULT]\nregion = us-east-1\n\n[aws]\naccess_key = AKIAEXAMPLE\nsecret = {CANARY}\n".encode()
