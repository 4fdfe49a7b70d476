"""Fixtures shared by the unit tests."""
import pytest
from oracles import torch_threads


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests (see oracles.torch_threads); the setting is restored after.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``, or as a test's argument.
    """
    with torch_threads(1):
        yield
