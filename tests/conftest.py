"""Shared fixtures: deterministic seeding and the device parametrization."""

import numpy as np
import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on: cpu always, cuda (marked ``cuda``) when a GPU is present."""
    return request.param


def pytest_terminal_summary(terminalreporter):
    """How many cases the property-based fuzz tests (tests/_fuzz.py) generated in this run."""
    import sys

    fuzz = sys.modules.get("_fuzz")
    if fuzz is not None and fuzz.CASES["n"]:
        terminalreporter.write_line(f"fuzz: {fuzz.CASES['n']} generated cases ran "
                                    f"(hypothesis profile {fuzz.PROFILE!r})")
