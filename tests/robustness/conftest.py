"""The fuzz builders (``tests/robustness/fuzz/builders.py``) as a fixture: the tests import no sibling module."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fuzz():
    path = Path(__file__).parent / "fuzz" / "builders.py"
    spec = importlib.util.spec_from_file_location("scaleprotoseg_fuzz_builders", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
