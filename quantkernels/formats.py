"""Named weight-storage formats. A module records which format its buffers hold, so a
kernel never guesses a layout from a shape (docs/numerics.md section 3)."""

from __future__ import annotations

import enum


class WeightFormat(str, enum.Enum):
    """How a quantized weight ``[N, K]`` is laid out in memory."""

    #: int8 ``[N, K]`` row-major (F.linear layout), values in [-127, 127]; one float32 scale per row.
    INT8_PLAIN = "int8_plain"
    #: uint8 ``[N, K/2]``, two *signed* int4 values per byte along K:
    #: ``byte = (q[2i] & 0xF) | (q[2i+1] & 0xF) << 4``; float32 scales ``[N, K/G]``.
    INT4_PLAIN = "int4_plain"
    #: as INT4_PLAIN with *unsigned* nibbles in [0, 15] and uint8 zero points ``[N, K/G]``.
    UINT4_PLAIN = "uint4_plain"
    #: bitsandbytes' 4-bit float codes (docs/numerics.md s.11): uint8 ``[N, K/2]``, two codes per byte,
    #: the first of each pair in the *high* nibble; blocks of ``group_size`` over the flattened weight.
    NF4 = "nf4"
    FP4 = "fp4"

