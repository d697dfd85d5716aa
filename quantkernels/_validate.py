"""Input validation shared by the fake kernels and the reference kernels.

Every check raises with a message that names the op, the argument and the offending
value. Checks look at metadata (dtype, shape, device), so they cost nothing on a hot path
and trace cleanly under ``torch.compile``. The one exception, :func:`zero_points`, reads
values, and only in eager mode on concrete tensors (never while tracing, under FakeTensor
or during CUDA graph capture, where it would need a host synchronisation).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Largest K for which an int8 x int8 dot product cannot overflow int32, for *any*
#: int8 input: 128 * 128 * K < 2**31, K <= 131,071 (docs/numerics.md s.4; values in
#: [-127, 127] alone would allow 133,143, but int8_gemm also accepts -128).
MAX_K_INT8 = (2**31 - 1) // (128 * 128)

#: int4 zero points lie in [0, MAX_ZERO_INT4] (csrc/qk_limits.h: kMaxZeroInt4).
MAX_ZERO_INT4 = 15

#: Group sizes accepted for int4 group-wise quantization (besides G = K).
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"quantkernels.{op}: {msg}")


def check(cond, op: str, msg, exc=ValueError):
    """``torch._check``-style check that stays a plain ``if`` for concrete values."""
    if not isinstance(cond, bool):
        # SymBool under tracing: let torch record the guard.
        torch._check(cond, lambda: f"quantkernels.{op}: {msg() if callable(msg) else msg}")
        return
    if not cond:
        _fail(op, msg() if callable(msg) else msg, exc)


def dtype_in(op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]):
    check(
        t.dtype in dtypes,
        op,
        lambda: f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}",
        TypeError,
    )


def ndim_is(op: str, name: str, t: torch.Tensor, ndim: int, what: str):
    check(t.dim() == ndim, op, lambda: f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")


def shape_is(op: str, name: str, t: torch.Tensor, shape: Sequence[int], what: str = ""):
    check(
        tuple(t.shape) == tuple(shape),
        op,
        lambda: f"{name} must have shape {tuple(shape)}{' ' + what if what else ''}, got {tuple(t.shape)}",
    )


def same_device(op: str, **tensors: Optional[torch.Tensor]):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        check(
            t.device == first.device,
            op,
            lambda: f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one device",
        )


def out_dtype(op: str, dtype: Optional[torch.dtype], default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    check(
        dtype in FLOAT_DTYPES,
        op,
        lambda: f"out_dtype must be one of float16, bfloat16, float32, got {dtype}",
        TypeError,
    )
    return dtype


def k_bound(op: str, K: int, limit: int = MAX_K_INT8, what: str = "K"):
    check(
        K <= limit,
        op,
        lambda: f"{what} = {K} exceeds {limit}, beyond which the int32 accumulator could overflow",
    )


def float_rows(op: str, name: str, x: torch.Tensor, min_dim: int = 1):
    dtype_in(op, name, x, FLOAT_DTYPES)
    check(x.dim() >= min_dim, op, lambda: f"{name} must have at least {min_dim} dimension(s), got a {x.dim()}-D tensor")
    check(x.shape[-1] > 0, op, lambda: f"{name} must have a non-empty last dimension K, got shape {tuple(x.shape)}")


def bias(op: str, b: Optional[torch.Tensor], N: int, ref: torch.Tensor):
    if b is None:
        return
    dtype_in(op, "bias", b, FLOAT_DTYPES)
    shape_is(op, "bias", b, (N,), "(one value per output channel N)")
    same_device(op, bias=b, **{"the other inputs": ref})


def group_size(op: str, G: int, K: int):
    check(
        G in INT4_GROUP_SIZES or G == K or G == -1,
        op,
        lambda: f"group_size must be one of {INT4_GROUP_SIZES}, -1 or K (= {K}) for per-channel, got {G}",
    )
    G = K if G == -1 else G
    check(K % G == 0, op, lambda: f"K = {K} must be a multiple of group_size = {G}")
    return G


def int4_packed(op: str, name: str, packed: torch.Tensor):
    dtype_in(op, name, packed, (torch.uint8,))
    ndim_is(op, name, packed, 2, "[N, K/2] (two int4 values per byte along K)")


def groups_of(op: str, scale_name: str, scale: torch.Tensor, N: int, K: int) -> int:
    """Validates a [N, K/G] group-scale tensor and returns G."""
    dtype_in(op, scale_name, scale, (torch.float32,))
    ndim_is(op, scale_name, scale, 2, "[N, K/group_size]")
    check(scale.shape[0] == N, op, lambda: f"{scale_name} must have N = {N} rows, got shape {tuple(scale.shape)}")
    ng = scale.shape[1]
    check(ng > 0 and K % ng == 0, op,
          lambda: f"{scale_name} has {ng} groups per row, which does not divide K = {K}")
    G = K // ng
    check(G in INT4_GROUP_SIZES or G == K, op,
          lambda: f"{scale_name} implies group_size = K / {ng} = {G}; must be one of {INT4_GROUP_SIZES} or K")
    return G


def _values_readable(t: torch.Tensor) -> bool:
    """True when reading t's values is an eager, concrete operation (no tracing, no fake or
    meta tensor, no CUDA graph capture on t's device)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    from torch._subclasses.fake_tensor import is_fake

    if t.device.type == "meta" or is_fake(t) or torch._is_functional_tensor(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def zero_points(op: str, name: str, z: Optional[torch.Tensor]):
    """int4 zero points must lie in [0, 15] (uint8, so only the upper end is checked)."""
    if z is None or z.numel() == 0 or not _values_readable(z):
        return
    mx = int(z.max())
    check(mx <= MAX_ZERO_INT4, op, lambda: f"{name} must hold int4 zero points in [0, {MAX_ZERO_INT4}], got {mx}")


#: The 4-bit float formats (docs/numerics.md s.11) and their block sizes.
QUANT_TYPES_4BIT = ("nf4", "fp4")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def quant_type_4bit(op: str, quant_type):
    check(quant_type in QUANT_TYPES_4BIT, op,
          lambda: f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")


def blocksize_4bit(op: str, blocksize):
    check(blocksize in BLOCKSIZES_4BIT, op,
          lambda: f"blocksize must be one of {BLOCKSIZES_4BIT} (a power of two from 32 to 4096), got {blocksize!r}")


def all_finite(op: str, name: str, t: torch.Tensor, why: str):
    """Eager-only (like zero_points): rejects a tensor holding NaN or +-Inf."""
    if t.numel() == 0 or not _values_readable(t):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        v = float(t.reshape(-1)[i])
        _fail(op, f"{name} holds the non-finite value {v} at flat index {i}; {why}")
