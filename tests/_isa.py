"""The CPU ISA levels a test runs its C++ kernels on: every level of quantkernels._native.ISA_LEVELS,
with the ones this CPU (or its OS) lacks skipped, and the skip says so."""

import pytest

from quantkernels import _native


def isa_params(levels=_native.ISA_LEVELS):
    """pytest params, one per level; a level the machine lacks is a skip naming the level."""
    have = set(_native.cpu_isa_levels())
    return [pytest.param(level, id=level,
                         marks=pytest.mark.skipif(level not in have,
                                                  reason=f"this CPU/OS lacks ISA level {level} "
                                                         f"(it has: {', '.join(sorted(have)) or 'none'})"))
            for level in levels]


@pytest.fixture(params=isa_params())
def isa(request, monkeypatch):
    """Runs the test at every ISA level (QUANTKERNELS_CPU_ISA set for it); import it into a test module."""
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", request.param)
    assert _native.cpu_isa() == request.param
    return request.param


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads{t}")
def threads(request):
    """Runs the test at 1 and 2 torch threads, then restores the count."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)
