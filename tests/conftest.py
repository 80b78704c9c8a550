import json
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run and machine: CI cannot be flaky on a rare draw.
settings.register_profile("dinoseg", derandomize=True, deadline=None)
settings.load_profile("dinoseg")

FIXTURES = Path(__file__).parent / "fixtures" / "official"
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def official_index() -> dict:
    return json.loads((FIXTURES / "index.json").read_text())


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


def pytest_configure(config):
    # Under pytest-xdist (`make test` runs two workers on the two cores), one thread per worker: two
    # oversubscribed thread pools run slower than one each.
    if hasattr(config, "workerinput"):
        torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Tiny tensor ops: with other processes on the 2 cores, intra-op threads spin and run ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
