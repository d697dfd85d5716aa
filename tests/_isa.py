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
