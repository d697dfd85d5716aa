"""GPTQ (Frantar et al., 2022) producing QuantLinear weights in our packed formats, and import /
export of checkpoints in the common GPTQ layout (AutoGPTQ / GPTQModel / transformers).

The quantized values are exactly those our kernels consume (docs/numerics.md s.1-3):
  - ``w4a16``: unsigned int4 with a float32 scale and a uint8 zero point per group of G
    consecutive input channels (asymmetric min-max, s.2); ``sym=True`` stores the symmetric
    grid ``scale = absmax / 7`` as zero point 8 (q + 8 in [0, 15]), still UINT4_PLAIN;
  - ``w4a8``: signed int4 per group, ``scale = absmax / 7`` (s.3);
  - ``w8a8`` / ``w8a16`` / ``llm_int8``: int8 per output channel, ``scale = absmax / 127`` (s.1).
GPTQ fixes each group's scale / zero from the weights with exactly the reference formulas,
then chooses the integer of every column with error feedback through the inverse Hessian.
With an identity Hessian it reproduces round-to-nearest (``reference.quantize_*``) bit for bit.

Group parameters. Without act-order they are computed when the sweep reaches the group's
first column, from the group's weights *as updated* by the error feedback so far (as the
reference implementation does). With ``act_order=True`` the columns are visited in
decreasing order of ``diag(H)``, but our kernels have no ``g_idx``: a group must stay G
consecutive input channels. So act-order runs the "static groups" variant: every group's
parameters are computed first, from the original weights in the original order, then the
columns are quantized in act order against those fixed grids. The stored layout is the plain
one; no permutation reaches the kernels or the activations.

Numerics: the Hessian ``X^T X / n`` is summed over batches in float64 (each batch in float32);
damping ``damp * mean(diag H)``
is added (and multiplied by 10 up to 6 times if the Cholesky factorisation still fails);
the inverse's Cholesky factor is computed in float64 and the sweep runs in float32.
Dead input channels (``H[k, k] == 0``: never active in the calibration data) get
``H[k, k] = 1``, which decouples them: they are rounded to nearest and feed no error to the
others. Unlike the reference implementation we do not zero their weights, so an input that
the calibration data never exercised still sees its (rounded) weight at inference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _ops as ops
from . import reference as R
from .calibration import (LayerStats, linear_in_features, linear_weight, select_linears,
                          sequential_stats)
from .convert import QuantizationReport
from .nn import INT4_SCHEMES, SCHEMES, QuantLinear, _check_scheme, unsupported_reason

INT8_SCHEMES = tuple(s for s in SCHEMES if s not in INT4_SCHEMES)


# --------------------------------------------------------------------------- quantization grids


class _Grid:
    """Per-row parameters of one group and the round-to-nearest of a column onto them, with the
    very expressions of ``reference.py`` (so that RTN results agree bit for bit)."""

    def __init__(self, kind: str, wg: Tensor):
        self.kind = kind
        if kind == "asym4":
            self.scale, self.zero = R._asym_params(wg.amin(dim=1), wg.amax(dim=1), 0, 15)
            self.qmin, self.qmax = 0, 15
        elif kind in ("sym4", "sym4u"):
            absmax = wg.abs().amax(dim=1)
            self.scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / R._const(7.0, absmax))
            self.zero = torch.full_like(absmax, 8.0) if kind == "sym4u" else torch.zeros_like(absmax)
            self.qmin, self.qmax = (0, 15) if kind == "sym4u" else (-8, 7)
        elif kind == "int8":
            absmax = wg.abs().amax(dim=1)
            is_zero = absmax == 0
            self.inv = torch.where(is_zero, torch.zeros_like(absmax), R._const(127.0, absmax) / absmax)
            self.scale = torch.where(is_zero, torch.ones_like(absmax), absmax / R._const(127.0, absmax))
            self.zero = torch.zeros_like(absmax)
            self.qmin, self.qmax = -127, 127
        else:
            raise ValueError(kind)

    def quantize(self, w: Tensor) -> Tensor:
        """Integer values (as float) of the column ``w`` [N]."""
        if self.kind == "int8":
            return R._rne(w * self.inv).clamp(self.qmin, self.qmax)
        return (R._rne(w / self.scale) + self.zero).clamp(self.qmin, self.qmax)

    def dequantize(self, q: Tensor) -> Tensor:
        return (q - self.zero) * self.scale


def _grid_kind(scheme: str, sym: bool) -> str:
    if scheme == "w4a16":
        return "sym4u" if sym else "asym4"
    if scheme == "w4a8":
        if not sym:
            raise ValueError("quantkernels.gptq: w4a8 weights are symmetric int4 (docs/numerics.md s.3); sym=False "
                             "is not representable")
        return "sym4"
    return "int8"


@dataclass
class GPTQResult:
    """Integer weight ``q`` [N, K] (float tensor of integers), ``scale`` / ``zero`` [N, K/G] (float32),
    ``loss``: GPTQ's proxy ``sum (w - q)^2 / (2 [H^-1]_kk)``, ``damp``: the damping finally used."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    group_size: int
    loss: float
    damp: float

    def dequantize(self) -> Tensor:
        N, K = self.q.shape
        ng = K // self.group_size
        qg = self.q.reshape(N, ng, self.group_size)
        return ((qg - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)).reshape(N, K)


def _inverse_hessian_factor(H: Tensor, damp: float) -> Tuple[Tensor, float, Tensor]:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` (float64), lambda, and the dead-channel mask."""
    H = H.to(torch.float64).clone()
    K = H.shape[0]
    if not bool(torch.isfinite(H).all()):
        raise ValueError("quantkernels.gptq: the Hessian holds NaN/Inf (non-finite calibration activations)")
    diag = torch.diagonal(H)
    dead = diag <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    diag[dead] = 1.0
    lam = damp * diag.mean().item()
    eye = torch.eye(K, dtype=torch.float64, device=H.device)
    for _ in range(7):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, lam, dead
        lam = lam * 10 if lam > 0 else 1e-6 * diag.mean().item()
    raise RuntimeError(f"quantkernels.gptq: Cholesky factorisation failed even with damping {lam:.3g}")


@torch.no_grad()
def gptq_quantize_weight(weight: Tensor, hessian: Tensor, scheme: str = "w4a16", *, group_size: int = 128,
                         sym: bool = False, act_order: bool = False, static_groups: bool = False,
                         damp: float = 0.01, blocksize: int = 128) -> GPTQResult:
    """GPTQ of one weight ``[N, K]`` (F.linear layout) given the Hessian ``X^T X / n`` ``[K, K]``.

    ``scheme`` picks the grid (module docstring); ``group_size`` (int4 only; -1 or K: per
    channel) is ignored for the per-channel int8 schemes. ``damp`` is relative to mean(diag H).
    """
    _check_scheme(scheme)
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"quantkernels.gptq: weight must be [N, K] and hessian [K, K], got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    if not damp >= 0:
        raise ValueError(f"quantkernels.gptq: damp must be >= 0, got {damp}")
    N, K = weight.shape
    kind = _grid_kind(scheme, sym)
    if scheme in INT4_SCHEMES:
        G = K if group_size == -1 else group_size
        why = unsupported_reason(scheme, K, N, G)
        if why:
            raise ValueError(f"quantkernels.gptq: {why}")
    else:
        G = K
    ng = K // G
    W = weight.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(W).all()):
        raise ValueError("quantkernels.gptq: the weight holds NaN or Inf values")
    static = static_groups or act_order or G == K
    grids = [_Grid(kind, W[:, g * G:(g + 1) * G]) for g in range(ng)] if static else [None] * ng
    H = hessian.to(device=W.device, dtype=torch.float64)
    perm = None
    if act_order:  # columns by decreasing diag(H); dead ones last
        dg = torch.diagonal(H)
        perm = torch.argsort(dg.masked_fill(dg <= 0, -1.0), descending=True, stable=True)
        H = H[perm][:, perm]
        W = W[:, perm]
    U, lam, _ = _inverse_hessian_factor(H, damp)
    U = U.to(torch.float32)

    # the block never straddles a group, so a group's parameters see all updates before it
    bs = G * max(1, round(blocksize / G)) if G < K else max(1, blocksize)
    gcol = [(c // G) for c in (perm.tolist() if perm is not None else range(K))]
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = gcol[i1 + i]
            if grids[g] is None:  # first column of a group, no act-order: params from current weights
                grids[g] = _Grid(kind, W1[:, i:i + G])
            grid = grids[g]
            w = W1[:, i]
            d = U1[i, i]
            q = grid.quantize(w)
            Q1[:, i] = q
            wq = grid.dequantize(q)
            err = (w - wq) / d
            loss += ((w - wq) ** 2).sum().double() / (2 * d.double() ** 2)
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        if i2 < K:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    scale = torch.stack([gr.scale for gr in grids], dim=1)
    zero = torch.stack([gr.zero for gr in grids], dim=1)
    return GPTQResult(Q, scale, zero, G, float(loss), lam)


def quantlinear_from_ints(linear: nn.Module, scheme: str, q: Tensor, scale: Tensor, zero: Optional[Tensor],
                          group_size: int, backend: str = "auto") -> QuantLinear:
    """A QuantLinear holding the given integer weight ``q`` [N, K] (integers, any dtype) and its
    float32 ``scale`` ([N] for int8, [N, K/G] for int4) / uint8-range ``zero`` [N, K/G] (w4a16);
    bias copied from ``linear`` (nn.Linear or Conv1D)."""
    W = linear_weight(linear)
    N, K = W.shape
    b = linear.bias
    mod = QuantLinear(K, N, bias=b is not None, scheme=scheme, group_size=group_size, backend=backend,
                      device=W.device, dtype=b.dtype if b is not None else W.dtype)
    with torch.no_grad():
        if scheme == "w4a16":
            mod.qweight = ops.pack_int4(q.to(torch.uint8))
            mod.weight_scale = scale.to(torch.float32).reshape(N, -1).contiguous()
            mod.weight_zero = zero.to(torch.uint8).reshape(N, -1).contiguous()
        elif scheme == "w4a8":
            mod.qweight = ops.pack_int4(q.to(torch.int8))
            mod.weight_scale = scale.to(torch.float32).reshape(N, -1).contiguous()
        else:
            mod.qweight = q.to(torch.int8).contiguous()
            mod.weight_scale = scale.to(torch.float32).reshape(N).contiguous()
        if b is not None:
            mod.bias = b.detach().clone()
    return mod


def gptq_quantlinear(linear: nn.Module, hessian: Tensor, scheme: str = "w4a16", *, group_size: int = 128,
                     sym: bool = False, act_order: bool = False, static_groups: bool = False,
                     damp: float = 0.01, blocksize: int = 128, backend: str = "auto") -> Tuple[QuantLinear, GPTQResult]:
    """GPTQ of one layer into a new QuantLinear (see ``gptq_quantize_weight``)."""
    W = linear_weight(linear).detach()
    res = gptq_quantize_weight(W, hessian.to(W.device), scheme, group_size=group_size, sym=sym,
                               act_order=act_order, static_groups=static_groups, damp=damp, blocksize=blocksize)
    zero = res.zero if scheme == "w4a16" else None
    scale = res.scale if scheme in INT4_SCHEMES else res.scale[:, 0]
    return quantlinear_from_ints(linear, scheme, res.q, scale, zero, res.group_size, backend), res


@dataclass
class GPTQReport(QuantizationReport):
    """``QuantizationReport`` plus, per quantized layer, GPTQ's loss proxy and damping."""

    method: str = "gptq"
    layers: Dict[str, dict] = field(default_factory=dict)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, batches: Iterable, scheme: str = "w4a16", *, group_size: int = 128,
                        sym: bool = False, act_order: bool = False, static_groups: bool = False,
                        damp: float = 0.01, blocksize: int = 128, include=None, exclude=("lm_head",),
                        blocks: Optional[str] = "auto", backend: str = "auto", mask_padding: bool = True,
                        progress: bool = True) -> nn.Module:
    """GPTQ of every selected linear layer of ``model``, in place (layers become QuantLinear).

    ``batches``: calibration inputs, each a dict of model kwargs (tokenizer output), a tuple or
    a tensor. The model's repeated blocks are processed one after the other
    (``calibration.BlockwiseRunner``): each block's Hessians are collected on the outputs of
    the already quantized blocks before it, its layers quantized, then it is replayed to feed
    the next block. Layers outside the blocks (e.g. a pooler) are done last with one full
    pass. ``blocks``: "auto", a module path (``"model.layers"``) or None (one pass, every
    Hessian in memory at once, no sequential error propagation).
    Other arguments: ``gptq_quantize_weight``. Returns ``model`` with ``model.quantkernels_report``
    (a ``GPTQReport``). If anything raises part-way (a batch the model rejects in a later block, a
    factorisation that fails), the float layers already replaced are put back: the model is left
    as it was. (So the float layers stay in memory until the last block is done.)
    """
    _check_scheme(scheme)
    kind = _grid_kind(scheme, sym)  # validates sym for w4a8
    del kind
    if not (isinstance(damp, (int, float)) and damp >= 0):  # per layer it would fail half-way through
        raise ValueError(f"quantkernels.gptq_quantize_model: damp must be a number >= 0, got {damp!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"quantkernels.gptq_quantize_model: blocksize must be an int >= 1, got {blocksize!r}")
    layers = select_linears(model, include, exclude)
    report = GPTQReport(scheme)
    targets = {}
    for n, m in layers.items():
        W = linear_weight(m)
        why = unsupported_reason(scheme, W.shape[1], W.shape[0], group_size)
        if why:
            report.skipped[n] = why
        else:
            targets[n] = m
    batches = list(batches)
    if not batches:
        raise ValueError("quantkernels.gptq_quantize_model: batches is empty; GPTQ needs calibration batches "
                         "(tokenizer outputs, tuples or tensors the model takes) to estimate each layer's Hessian")
    if not targets:
        raise ValueError(f"quantkernels.gptq_quantize_model: scheme {scheme!r} (group_size={group_size}) can serve "
                         f"none of the {len(layers)} selected linear layer(s): "
                         f"{'; '.join(sorted(set(report.skipped.values()))[:3]) or 'no linear layer selected'}")

    replaced: Dict[str, nn.Module] = {}  # name -> the float layer, until every block is done

    def on_block(stats: Dict[str, LayerStats], mods: Dict[str, nn.Module]):
        for n, m in mods.items():
            st = stats[n]
            if st.n == 0:
                report.skipped[n] = "never called on the calibration data"
                continue
            ql, res = gptq_quantlinear(m, st.hessian(), scheme, group_size=group_size, sym=sym,
                                       act_order=act_order, static_groups=static_groups, damp=damp,
                                       blocksize=blocksize, backend=backend)
            replaced[n] = m
            _set_module(model, n, ql)
            report.quantized.append(n)
            report.layers[n] = dict(loss=res.loss, damp=res.damp, tokens=st.n)

    try:
        sequential_stats(model, batches, targets, on_block, hessian=True, absmax=False, blocks=blocks,
                         mask_padding=mask_padding, progress=progress)
    except BaseException:  # a later block failed: put the float layers back (GPTQ never edits them)
        for n, old in reversed(list(replaced.items())):
            _set_module(model, n, old)
        raise
    replaced.clear()
    if report.skipped:
        import warnings

        warnings.warn(f"quantkernels.gptq_quantize_model: kept {len(report.skipped)} layer(s) in float: "
                      + "; ".join(f"{n} ({r})" for n, r in report.skipped.items()), stacklevel=2)
    model.quantkernels_report = report
    return model


# --------------------------------------------------------------------------- GPTQ checkpoint format
#
# The common layout (AutoGPTQ "gptq" checkpoint_format, read by transformers / vLLM / GPTQModel)
# of a 4-bit linear layer with weight [N, K] and G-wide groups:
#   qweight int32 [K/8, N]:   qweight[i, n] = sum_j q[n, 8i + j] << 4j     (8 nibbles along K)
#   qzeros  int32 [K/G, N/8]: qzeros[g, i]  = sum_j z'[n=8i + j, g] << 4j  (8 nibbles along N)
#   scales  fp16  [K/G, N]
#   g_idx   int32 [K]:        group of input channel k (k // G without act-order)
# dequant: (q - z) * scale. In the original "gptq" (v1) format z' = z - 1 (an AutoGPTQ quirk
# kept for compatibility), so z = 0 is not representable; "gptq_v2" (GPTQModel) stores z' = z.


def _to_int32(v: Tensor) -> Tensor:
    """uint32 values held in int64 -> int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _pack8(u: Tensor, dim: int) -> Tensor:
    """Packs 4-bit values (0..15) 8 per int32 along ``dim`` (lowest nibble first)."""
    u = u.to(torch.int64).movedim(dim, -1)
    if u.shape[-1] % 8:
        raise ValueError(f"quantkernels.gptq: the packed dimension ({u.shape[-1]}) must be a multiple of 8")
    u = u.reshape(*u.shape[:-1], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=u.device)
    return _to_int32((u << shifts).sum(-1)).movedim(-1, dim)


def _unpack8(p: Tensor, dim: int) -> Tensor:
    p = p.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=p.device)
    u = (p.unsqueeze(-1) >> shifts) & 0xF
    return u.reshape(*p.shape[:-1], -1).movedim(-1, dim)


def _check_format(fmt: str) -> int:
    if fmt == "gptq":
        return 1
    if fmt == "gptq_v2":
        return 0
    raise ValueError(f"quantkernels.gptq: checkpoint_format must be 'gptq' or 'gptq_v2', got {fmt!r}")


def export_gptq_tensors(ql: QuantLinear, checkpoint_format: str = "gptq",
                        scale_dtype: torch.dtype = torch.float16) -> Dict[str, Tensor]:
    """``{qweight, qzeros, scales, g_idx[, bias]}`` of a ``w4a16`` QuantLinear in the GPTQ layout.
    ``scale_dtype=float16`` is the common format (scales rounded to fp16, as every GPTQ
    checkpoint holds them); ``float32`` keeps ours exactly."""
    off = _check_format(checkpoint_format)
    if ql.scheme != "w4a16":
        raise ValueError(f"quantkernels.gptq: only w4a16 layers export to the GPTQ format, got {ql.scheme}")
    N, K, G = ql.out_features, ql.in_features, ql.group_size
    if N % 8 or K % 8:
        raise ValueError(f"quantkernels.gptq: the GPTQ format needs N and K multiples of 8, got N={N}, K={K}")
    q = ops.unpack_int4(ql.qweight, signed=False)                    # [N, K] uint8
    z = ql.weight_zero.to(torch.int64)                               # [N, K/G]
    if off and bool((z == 0).any()):
        raise ValueError("quantkernels.gptq: a zero point of 0 is not representable in the 'gptq' (v1) format "
                         "(it stores zero - 1); use checkpoint_format='gptq_v2'")
    scales = ql.weight_scale.t().contiguous()
    if scale_dtype != torch.float32:
        s16 = scales.to(scale_dtype)
        if not bool(torch.isfinite(s16).all()) or bool(((s16 == 0) & (scales != 0)).any()):
            raise ValueError(f"quantkernels.gptq: scales overflow/underflow in {scale_dtype}; use float32")
        scales = s16
    out = dict(qweight=_pack8(q.t(), 0),                           # [K/8, N]
               qzeros=_pack8((z - off).t(), 1),                    # [K/G, N/8]
               scales=scales,                                      # [K/G, N]
               g_idx=(torch.arange(K, device=q.device) // G).to(torch.int32))
    if ql.bias is not None:
        out["bias"] = ql.bias.detach().clone()
    return out


def quantlinear_from_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor] = None,
                          bias: Optional[Tensor] = None, *, checkpoint_format: str = "gptq",
                          backend: str = "auto") -> QuantLinear:
    """A ``w4a16`` QuantLinear from GPTQ tensors (layout above; 4 bits only).

    ``g_idx`` may be any labelling whose groups are runs of G consecutive input channels
    (including static-groups act-order checkpoints, whose groups are permuted). A checkpoint
    with act-order *without* static groups scatters a group over K: that is not representable
    without permuting the activations, and is rejected with a clear error.
    """
    off = _check_format(checkpoint_format)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError(f"quantkernels.gptq: qweight and qzeros must be int32, got {qweight.dtype}, {qzeros.dtype}")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"quantkernels.gptq: scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if g_idx is not None and (g_idx.is_floating_point() or g_idx.dtype == torch.bool):
        raise TypeError(f"quantkernels.gptq: g_idx must hold integers, got {g_idx.dtype}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"quantkernels.gptq: bias must be a float tensor, got {bias.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"quantkernels.gptq: qweight, qzeros and scales must be 2-D, got shapes "
                         f"{tuple(qweight.shape)}, {tuple(qzeros.shape)}, {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("quantkernels.gptq: scales hold NaN or Inf values")
    K8, N = qweight.shape
    K = K8 * 8
    ng = scales.shape[0]
    if scales.shape != (ng, N) or qzeros.shape != (ng, N // 8) or ng == 0 or K % ng:
        raise ValueError(f"quantkernels.gptq: inconsistent shapes qweight {tuple(qweight.shape)}, "
                         f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)} (4-bit expected)")
    G = K // ng
    q = _unpack8(qweight, 0).t()                                    # [N, K]
    z = (_unpack8(qzeros, 1) + off).t()                            # [N, ng]
    if bool((z > 15).any()):
        raise ValueError("quantkernels.gptq: a stored zero point of 15 in the 'gptq' (v1) format means 16, "
                         "outside uint4; is this a gptq_v2 checkpoint?")
    s = scales.to(torch.float32).t()                               # [N, ng]
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64).reshape(-1)
        if g_idx.numel() != K or bool(((g_idx < 0) | (g_idx >= ng)).any()):
            raise ValueError(f"quantkernels.gptq: g_idx must hold {K} group indices in [0, {ng})")
        runs = g_idx.reshape(ng, G)
        if not bool((runs == runs[:, :1]).all()):
            raise ValueError("quantkernels.gptq: g_idx scatters groups over K (act-order without static "
                             "groups); our kernels need each group to be G consecutive input channels")
        sel = runs[:, 0]
        s, z = s[:, sel], z[:, sel]
    lin = nn.Linear(K, N, bias=bias is not None, device="meta")
    lin.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    lin.weight = nn.Parameter(torch.empty(N, K, device=q.device), requires_grad=False)
    return quantlinear_from_ints(lin, "w4a16", q, s, z, G, backend)


def save_gptq_checkpoint(model: nn.Module, path: str, checkpoint_format: str = "gptq",
                         scale_dtype: torch.dtype = torch.float16) -> None:
    """Writes ``model`` (its w4a16 QuantLinear layers in the GPTQ layout, every other tensor as is)
    to ``path/model.safetensors`` plus ``path/quantize_config.json``."""
    from safetensors.torch import save_file

    _check_format(checkpoint_format)
    if scale_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"quantkernels.save_gptq_checkpoint: scale_dtype must be torch.float16 or torch.float32, "
                         f"got {scale_dtype!r}")
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("quantkernels.save_gptq_checkpoint: the model has no QuantLinear layer; quantize it with "
                         "scheme 'w4a16' first")
    tensors, group_sizes, syms = {}, set(), set()
    qnames = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for k, v in export_gptq_tensors(m, checkpoint_format, scale_dtype).items():
                tensors[f"{n}.{k}"] = v.contiguous()
            group_sizes.add(m.group_size)
            syms.add(bool((m.weight_zero == 8).all()))
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in qnames:
            tensors[k] = v.contiguous()
    if len(group_sizes) > 1:
        raise ValueError(f"quantkernels.gptq: one group size per checkpoint, got {sorted(group_sizes)}")
    os.makedirs(path, exist_ok=True)
    # tied weights (embeddings / lm_head) are one tensor in memory: safetensors wants distinct storage
    seen = {}
    for k, v in list(tensors.items()):
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            tensors[k] = v.clone()
        seen[key] = k
    from .serialization import CONFIG_SHA_KEY, config_sha256, tensor_checksums

    cfg = dict(quant_method="gptq", bits=4, group_size=group_sizes.pop() if group_sizes else 128,
               desc_act=False, sym=syms == {True}, checkpoint_format=checkpoint_format,
               true_sequential=False, damp_percent=None, static_groups=False,
               # ours (other tools ignore it): verified by load_gptq_checkpoint
               quantkernels_checksums=tensor_checksums(tensors))
    save_file(tensors, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt", CONFIG_SHA_KEY: config_sha256(cfg)})
    with open(os.path.join(path, "quantize_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _gptq_error(msg: str):
    from .serialization import CheckpointError

    return CheckpointError(f"quantkernels.load_gptq_checkpoint: {msg}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _gptq_error(f"{path}: unreadable or corrupt JSON ({type(e).__name__}: {e})") from None
    if not isinstance(c, dict):
        raise _gptq_error(f"{path}: expected a JSON object, got {type(c).__name__}")
    return c


def load_gptq_checkpoint(model: nn.Module, path: str, *, checkpoint_format: Optional[str] = None,
                         backend: str = "auto", strict: bool = True) -> nn.Module:
    """Loads a GPTQ checkpoint directory (``*.safetensors`` + ``quantize_config.json`` or a
    ``config.json`` with ``quantization_config``) into ``model``, in place: every linear layer
    ``name`` with ``name.qweight`` in the files becomes a ``w4a16`` QuantLinear; the other
    tensors are loaded into the model (``strict``: every model key must be present). Returns the
    model in eval mode (``model.eval()``), as transformers' ``from_pretrained`` does.

    Everything is read and checked before the model changes; a damaged or mismatched checkpoint
    raises :class:`~quantkernels.CheckpointError` and leaves the model as it was. A checkpoint
    written by ``save_gptq_checkpoint`` also carries the SHA-256 of every tensor (in
    ``quantize_config.json``) and of that config (in the safetensors metadata), which are verified."""
    from pathlib import Path

    from .dispatch import check_backend
    from .serialization import CONFIG_SHA_KEY, config_sha256, read_safetensors, verify_checksums

    check_backend(backend)
    if checkpoint_format is not None:
        _check_format(checkpoint_format)
    if not os.path.isdir(path):
        raise _gptq_error(f"{path}: not a directory (expected a GPTQ checkpoint directory)")
    cfg, cfg_file = {}, None
    for fn, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        p = os.path.join(path, fn)
        if os.path.exists(p):
            c = _read_json(p)
            c = c.get(key, {}) if key else c
            if c:
                if not isinstance(c, dict):
                    raise _gptq_error(f"{p}: {key} must be a JSON object, got {c!r}")
                cfg, cfg_file = c, fn
                break
    if cfg.get("bits", 4) != 4:
        raise _gptq_error(f"only 4-bit GPTQ checkpoints are supported, got bits={cfg['bits']!r}")
    fmt = checkpoint_format or cfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _gptq_error(f"{cfg_file}: checkpoint_format must be 'gptq' or 'gptq_v2', got {fmt!r}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise _gptq_error(f"no .safetensors file in {path}")
    tensors: Dict[str, Tensor] = {}
    metas = []
    for fn in files:
        t, meta = read_safetensors(Path(path) / fn, _gptq_error)
        dup = sorted(set(t) & set(tensors))
        if dup:
            raise _gptq_error(f"{fn} repeats tensor(s) {dup[:3]} of another file")
        tensors.update(t)
        metas.append(meta)
    recorded = {m[CONFIG_SHA_KEY] for m in metas if CONFIG_SHA_KEY in m}
    if recorded and (cfg_file != "quantize_config.json" or recorded != {config_sha256(cfg)}):
        raise _gptq_error(f"quantize_config.json does not belong to the safetensors file(s) or was changed after "
                          f"it was written (its SHA-256 differs from the one recorded in their metadata)")
    if "quantkernels_checksums" in cfg:
        verify_checksums(tensors, cfg["quantkernels_checksums"], _gptq_error)
    return load_gptq_state_dict(model, tensors, checkpoint_format=fmt, backend=backend, strict=strict)


@torch.no_grad()
def load_gptq_state_dict(model: nn.Module, tensors: Dict[str, Tensor], *, checkpoint_format: str = "gptq",
                         backend: str = "auto", strict: bool = True) -> nn.Module:
    """``load_gptq_checkpoint`` from tensors already in memory (returns the model in eval mode).
    Builds every new layer and checks every other tensor against the model first; raises
    ``CheckpointError`` with the model unchanged when anything does not fit."""
    from .calibration import is_linear

    _check_format(checkpoint_format)
    tensors = dict(tensors)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    new: Dict[str, QuantLinear] = {}
    for n in names:
        parts = {p: tensors.pop(f"{n}.{p}", None) for p in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        if parts["qzeros"] is None or parts["scales"] is None:
            raise _gptq_error(f"layer {n} lacks qzeros or scales")
        try:
            old = model.get_submodule(n)
        except AttributeError:
            raise _gptq_error(f"the checkpoint quantizes layer {n!r}, which this model does not have") from None
        if not is_linear(old):
            raise _gptq_error(f"layer {n!r} is a {type(old).__name__} in this model, not a linear layer")
        try:
            ql = quantlinear_from_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"],
                                       parts["bias"], checkpoint_format=checkpoint_format, backend=backend)
        except (ValueError, TypeError, RuntimeError, IndexError) as e:
            raise _gptq_error(f"layer {n}: {e}") from None
        W = linear_weight(old)
        if (ql.out_features, ql.in_features) != tuple(W.shape):
            raise _gptq_error(f"layer {n}: the checkpoint holds [out={ql.out_features}, in={ql.in_features}], the "
                              f"model's layer is [out={W.shape[0]}, in={W.shape[1]}]")
        if (old.bias is None) != (ql.bias is None):
            raise _gptq_error(f"layer {n}: bias {'missing from' if ql.bias is None else 'present in'} the checkpoint "
                              f"but {'present in' if ql.bias is None else 'absent from'} the model")
        if ql.bias is not None:
            ql.bias = ql.bias.to(old.bias.dtype)  # float tensors take the model's dtype
        new[n] = ql.to(W.device) if W.device.type != "meta" else ql
    prefixes = tuple(n + "." for n in names)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefixes)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected or (strict and missing):
        raise _gptq_error(f"checkpoint mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, t in tensors.items():
        ref = expected[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise _gptq_error(f"tensor {k!r} has shape {tuple(t.shape)}, the model's is {tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise _gptq_error(f"tensor {k!r} has dtype {t.dtype}, the model's is {ref.dtype}")
    # commit: nothing below can fail on a checked checkpoint
    for n, ql in new.items():
        _set_module(model, n, ql)
    on_meta = any(v.device.type == "meta" for v in expected.values() if isinstance(v, Tensor))
    rest = {k: (t.to(expected[k].dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    model.load_state_dict(rest, strict=False, assign=on_meta)
    return model.eval()  # inference mode, as from_pretrained: no live dropout


def rtn_error_ratio(weight: Tensor, x: Tensor, scheme: str = "w4a16", **kw) -> Tuple[float, float]:
    """(||X W^T - X W_rtn^T||, ||X W^T - X W_gptq^T||) for a weight and calibration inputs ``x`` [T, K];
    a diagnostic used by the tests and benchmarks."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    H = x.t() @ x / x.shape[0]
    W = weight.detach().float()
    G = kw.get("group_size", 128)
    if scheme == "w4a16":
        p, s, z = R.quantize_uint4_asym(W, G)
        Wr = R.dequantize_int4(p, s, z, torch.float32)
    elif scheme == "w4a8":
        p, s = R.quantize_int4_sym(W, G)
        Wr = R.dequantize_int4(p, s, None, torch.float32)
    else:
        q, s = R.quantize_int8_rowwise(W)
        Wr = R.dequantize_int8(q, s, None, torch.float32)
    Wg = gptq_quantize_weight(W, H, scheme, **kw).dequantize()
    ref = x @ W.double().t()
    e = lambda Wq: float(torch.linalg.norm(ref - x @ Wq.double().t()))  # noqa: E731
    return e(Wr), e(Wg)


__all__ = ["gptq_quantize_weight", "gptq_quantlinear", "gptq_quantize_model", "GPTQResult", "GPTQReport",
           "quantlinear_from_ints", "export_gptq_tensors", "quantlinear_from_gptq", "save_gptq_checkpoint",
           "load_gptq_checkpoint", "load_gptq_state_dict", "rtn_error_ratio"]
