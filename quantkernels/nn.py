"""QuantLinear: a drop-in replacement for ``nn.Linear`` whose forward calls quantkernels ops."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import _ops as ops
from . import _validate as V
from . import dispatch
from .autograd import _needs_autograd, quant_linear
from .formats import WeightFormat

#: scheme -> (weight format, what it does)
SCHEMES = {
    "w8a8": (WeightFormat.INT8_PLAIN, "int8 weights (per-channel) x int8 activations (dynamic per-token)"),
    "llm_int8": (WeightFormat.INT8_PLAIN, "w8a8 plus LLM.int8() outlier columns in floating point"),
    "w8a16": (WeightFormat.INT8_PLAIN, "int8 weights (per-channel), float activations"),
    "w4a16": (WeightFormat.UINT4_PLAIN, "asymmetric uint4 group-wise weights, float activations"),
    "w4a8": (WeightFormat.INT4_PLAIN, "symmetric int4 group-wise weights x int8 activations"),
    "nf4": (WeightFormat.NF4, "NF4 4-bit float codes, block-wise absmax (bitsandbytes), float activations"),
    "fp4": (WeightFormat.FP4, "FP4 4-bit float codes, block-wise absmax (bitsandbytes), float activations"),
}
INT4_SCHEMES = ("w4a16", "w4a8")
#: bitsandbytes' 4-bit float formats (docs/numerics.md s.11); group_size is their block size.
FLOAT4_SCHEMES = ("nf4", "fp4")


#: (scheme, backend, device, dispatch.GENERATION) -> the op callables of that scheme (dispatch.resolve)
_OPS_CACHE: dict = {}


def _scheme_ops(scheme: str, backend: str, device: torch.device) -> tuple:
    """``dispatch.resolve`` of each op of ``scheme`` (``dispatch.SCHEME_OPS``), cached until
    ``dispatch.refresh()``; backend "triton" is resolved on every call (it reads TRITON_INTERPRET)."""
    key = (scheme, backend, device, dispatch.GENERATION)
    fns = _OPS_CACHE.get(key)
    if fns is None:
        fns = tuple(dispatch.resolve(backend, op, device) for op in dispatch.SCHEME_OPS[scheme])
        if backend != "triton":
            if _OPS_CACHE and next(iter(_OPS_CACHE))[3] != dispatch.GENERATION:
                _OPS_CACHE.clear()  # entries of an earlier dispatch.refresh() are dead
            _OPS_CACHE[key] = fns
    return fns


def _run_scheme(scheme: str, x: Tensor, qweight: Tensor, scale: Tensor, zero: Optional[Tensor],
                bias: Optional[Tensor], threshold: float, backend: str) -> Tensor:
    """The op sequence of docs/numerics.md s.8 for a 2-D ``x`` (``autograd._forward``, with the op
    callables cached): no autograd, output in x's dtype."""
    if scheme not in SCHEMES:  # a scheme attribute changed by hand: the same error as quant_linear's
        return quant_linear(x, qweight, scale, zero, bias, scheme, threshold, backend)
    fns = _scheme_ops(scheme, backend, x.device)
    if scheme == "w8a8":
        q, sa = fns[0](x)
        return fns[1](q, qweight, sa, scale, bias, x.dtype)
    if scheme == "w4a8":
        q, sa = fns[0](x)
        return fns[1](q, qweight, sa, scale, None, bias, x.dtype)
    if scheme == "llm_int8":
        return fns[0](x, qweight, scale, bias, threshold)
    if scheme == "w8a16":
        return fns[0](x, qweight, scale, bias)
    return fns[0](x, qweight, scale, zero, bias)  # w4a16


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"quantkernels: scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
    return scheme


def unsupported_reason(scheme: str, in_features: int, out_features: int, group_size: int = 128) -> Optional[str]:
    """Why ``scheme`` cannot serve a [out_features, in_features] weight, or None if it can."""
    _check_scheme(scheme)
    K = in_features
    if K < 1 or out_features < 1:
        return f"empty weight [{out_features}, {in_features}]"
    if scheme in FLOAT4_SCHEMES:
        if group_size not in V.BLOCKSIZES_4BIT:
            return (f"group_size (the block size) must be one of {V.BLOCKSIZES_4BIT} for {scheme}, "
                    f"got {group_size}")
        if K % 2:
            return f"in_features = {K} is odd; {scheme} packs two values per byte"
    elif scheme in INT4_SCHEMES:
        if group_size != -1 and group_size != K and group_size not in V.INT4_GROUP_SIZES:
            return (f"group_size must be one of {V.INT4_GROUP_SIZES}, -1 or K (= {K}) for per-channel, "
                    f"got {group_size}")
        G = K if group_size == -1 else group_size
        if K % 2:
            return f"in_features = {K} is odd; int4 packs two values per byte"
        if K % G:
            return f"in_features = {K} is not a multiple of group_size = {G}"
    elif K > V.MAX_K_INT8:
        return f"in_features = {K} exceeds {V.MAX_K_INT8}, beyond which the int32 accumulator could overflow"
    return None


def check_threshold(where: str, threshold) -> float:
    """The llm_int8 outlier threshold as a float: a number >= 0 (0 turns the outlier path off,
    docs/numerics.md s.5); NaN, negative and non-numbers raise, naming the value."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or threshold < 0:
        raise ValueError(f"quantkernels.{where}: threshold must be a number >= 0 (0 disables the outlier "
                         f"columns), got {threshold!r}")
    return float(threshold)


def all_finite(weight: Tensor, rows: int = 8192) -> bool:
    """No NaN / Inf in ``weight``, checked ``rows`` rows at a time: ``torch.isfinite`` of a whole
    262,144 x 640 fp32 matrix would take ~1 GiB of temporaries."""
    return all(bool(torch.isfinite(weight[i:i + rows]).all()) for i in range(0, weight.shape[0], rows))


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2 style): weight stored [in, out], y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def quantizable_weight(linear: nn.Module, where: str = "QuantLinear.from_linear") -> Tensor:
    """The ``[N, K]`` weight of an ``nn.Linear`` / GPT-2 ``Conv1D`` that can be quantized; raises
    (naming ``where``) for another module, a non-float or meta weight, or NaN / Inf values."""
    if isinstance(linear, nn.Linear):
        weight = linear.weight.detach()
    elif _is_hf_conv1d(linear):
        weight = linear.weight.detach().t()
    else:
        raise TypeError(f"quantkernels.{where}: linear must be torch.nn.Linear or a "
                        f"transformers Conv1D, got {type(linear).__name__}")
    if weight.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"quantkernels.{where}: weight dtype must be float16, bfloat16 or "
                        f"float32, got {weight.dtype}")
    if weight.device.type == "meta":
        raise ValueError(f"quantkernels.{where}: the layer's weight is on the meta device "
                         "(not loaded); load the weights first")
    if not all_finite(weight):
        raise ValueError(f"quantkernels.{where}: the weight holds NaN or Inf values; "
                         "refusing to quantize it")
    return weight


#: QuantLinear buffers whose dtype is part of the format (docs/numerics.md s.8): ``.to(dtype)``,
#: ``.half()`` ... move them between devices but never convert them.
_FIXED_DTYPE_BUFFERS = ("qweight", "weight_scale", "weight_zero", "input_scale", "nested_absmax", "absmax_offset")


def _device_only(fn, t: Tensor, owner: str, name: str) -> Tensor:
    """``fn`` (a ``Module._apply`` function) applied to ``t`` for its device and memory placement
    only: a float32 tensor travels as its int32 bit pattern, which dtype conversions leave alone."""
    carrier = t.view(torch.int32) if t.dtype == torch.float32 else t
    moved = fn(carrier)
    if not isinstance(moved, Tensor) or moved.dtype != carrier.dtype:
        raise TypeError(f"quantkernels.{owner}: cannot convert {name} ({t.dtype}) to "
                        f"{getattr(moved, 'dtype', type(moved).__name__)}: the quantized weights keep their "
                        f"dtype; .to(dtype) / .half() / .bfloat16() convert only the bias and the output")
    return moved.view(t.dtype) if t.dtype == torch.float32 else moved


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with a quantized ``W``; see ``SCHEMES``.

    Buffers (all persistent, so ``state_dict`` round-trips):
      - ``qweight``: int8 ``[N, K]`` (int8 schemes) or uint8 ``[N, K/2]`` (int4, PLAIN packing);
      - ``weight_scale``: float32 ``[N]`` (int8) or ``[N, K/G]`` (int4 group-wise);
      - ``weight_zero``: uint8 ``[N, K/G]`` zero points (w4a16 only);
      - nf4 / fp4 (docs/numerics.md s.11): ``qweight`` uint8 ``[N, K/2]`` (high nibble first),
        ``weight_scale`` the block absmax, float32 ``[ceil(N*K/G)]``, or with ``double_quant`` its
        uint8 codes, then with ``nested_absmax`` float32 ``[ceil(nb/256)]`` and ``absmax_offset``
        (0-D float32); both None otherwise;
      - ``bias``: ``[N]`` in the original layer's dtype, or None;
      - ``input_scale``: float32 ``[K]`` or None (default): when set (SmoothQuant, where the
        smoothing cannot be folded into a preceding layer) forward computes ``x / input_scale``
        per input channel before the quantized GEMM.
    ``weight_format`` names the layout of ``qweight`` (``formats.WeightFormat``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: str = "w8a8",
                 group_size: int = 128, threshold: float = 6.0, backend: str = "auto",
                 device=None, dtype: torch.dtype = torch.float32, double_quant: bool = False):
        super().__init__()
        if not isinstance(double_quant, bool):
            raise TypeError(f"quantkernels.QuantLinear: double_quant must be True or False, got {double_quant!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features), ("group_size", group_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"quantkernels.QuantLinear: {name} must be an int, got {v!r}")
        reason = unsupported_reason(scheme, in_features, out_features, group_size)
        if reason:
            raise ValueError(f"quantkernels.QuantLinear: scheme {scheme!r} cannot serve this layer: {reason}")
        check_threshold("QuantLinear", threshold)
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.backend = dispatch.check_backend(backend)
        self.threshold = float(threshold)
        self.weight_format = SCHEMES[scheme][0]
        if double_quant and scheme not in FLOAT4_SCHEMES:
            raise ValueError(f"quantkernels.QuantLinear: double_quant applies to {FLOAT4_SCHEMES} only, "
                             f"not to scheme {scheme!r}")
        self.double_quant = double_quant
        K, N = in_features, out_features
        self.register_buffer("nested_absmax", None)
        self.register_buffer("absmax_offset", None)
        if scheme in FLOAT4_SCHEMES:
            self.group_size = group_size
            nb = -(-(N * K) // group_size)
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_zero", None)
            if double_quant:
                self.register_buffer("weight_scale", torch.zeros(nb, dtype=torch.uint8, device=device))
                self.nested_absmax = torch.ones(-(-nb // 256), dtype=torch.float32, device=device)
                self.absmax_offset = torch.zeros((), dtype=torch.float32, device=device)
            else:
                self.register_buffer("weight_scale", torch.ones(nb, dtype=torch.float32, device=device))
        elif scheme in INT4_SCHEMES:
            self.group_size = K if group_size == -1 else group_size
            ng = K // self.group_size
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.ones(N, ng, dtype=torch.float32, device=device))
            zero = torch.zeros(N, ng, dtype=torch.uint8, device=device) if scheme == "w4a16" else None
            self.register_buffer("weight_zero", zero)
        else:
            self.group_size = K  # one scale per output channel
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.ones(N, dtype=torch.float32, device=device))
            self.register_buffer("weight_zero", None)
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_scale", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state_dict with an input_scale loads into a module built without one
        if self.input_scale is None and isinstance(state_dict.get(prefix + "input_scale"), Tensor):
            self.input_scale = torch.ones(self.in_features, dtype=torch.float32, device=self.qweight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``, ``.bfloat16()`` ...: the quantized buffers (integer
        weights, their fp32 scales and zero points, ``input_scale``) move to the new device but
        keep their dtype and bits; the bias follows the dtype (and the output follows the input's
        dtype). Every new buffer is computed before any is replaced, so a failing conversion
        leaves the module as it was."""
        fixed = {name: _device_only(fn, t, "QuantLinear", name) for name in _FIXED_DTYPE_BUFFERS
                 if (t := self._buffers.get(name)) is not None}
        super()._apply(fn, recurse)
        self._buffers.update(fixed)
        return self

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: str = "w8a8", *, group_size: int = 128,
                    threshold: float = 6.0, backend: str = "auto", double_quant: bool = False) -> "QuantLinear":
        """Quantizes an ``nn.Linear`` (or a Hugging Face GPT-2 ``Conv1D``) into a new QuantLinear."""
        weight = quantizable_weight(linear)
        N, K = weight.shape
        b = linear.bias
        mod = cls(K, N, bias=b is not None, scheme=scheme, group_size=group_size, threshold=threshold,
                  backend=backend, device=weight.device, dtype=b.dtype if b is not None else weight.dtype,
                  double_quant=double_quant)
        with torch.no_grad():
            for name, t in mod.quantize_weight(weight).items():
                setattr(mod, name, t)
            if b is not None:
                mod.bias = b.detach().clone()
        return mod

    #: rows quantized at a time: every format is row-wise, so chunks give the same bits and cap the
    #: float temporaries (a 262,144 x 640 tied lm_head would otherwise need several GiB of them)
    QUANTIZE_ROWS = 8192

    @torch.no_grad()
    def quantize_weight(self, weight: Tensor) -> dict:
        """The buffers (``qweight``, ``weight_scale`` and, for w4a16, ``weight_zero``; for nf4 / fp4
        with double_quant also ``nested_absmax``, ``absmax_offset``) that hold the float
        ``weight [N, K]`` in this layer's scheme and group size (docs/numerics.md s.1-3, s.11)."""
        if self.scheme in FLOAT4_SCHEMES:
            # QUANTIZE_ROWS * K is a multiple of every block size (<= 4096), so the chunks' blocks are
            # the whole weight's; the double quantization needs all absmax values (their mean)
            names = ("qweight", "weight_scale")
            fn = lambda w: ops.quantize_4bit(w, self.scheme, self.group_size)  # noqa: E731
        elif self.scheme == "w4a16":
            names = ("qweight", "weight_scale", "weight_zero")
            fn = lambda w: ops.quantize_uint4_asym(w, self.group_size)  # noqa: E731
        elif self.scheme == "w4a8":
            names, fn = ("qweight", "weight_scale"), lambda w: ops.quantize_int4_sym(w, self.group_size)  # noqa: E731
        else:
            names, fn = ("qweight", "weight_scale"), ops.quantize_int8_rowwise
        parts = [fn(weight[i:i + self.QUANTIZE_ROWS]) for i in range(0, weight.shape[0], self.QUANTIZE_ROWS)]
        if len(parts) == 1:
            out = dict(zip(names, parts[0]))
        else:
            out = {n: torch.cat([p[j] for p in parts]) for j, n in enumerate(names)}
        if self.scheme in FLOAT4_SCHEMES and self.double_quant:
            q, nested, offset = ops.double_quantize_absmax(out["weight_scale"])
            out.update(weight_scale=q, nested_absmax=nested, absmax_offset=offset)
        return out

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        # The hot path of every quantized model (Gemma-3-270M decode: 126 calls per token, ~10 us of
        # kernel each): buffers read from _buffers directly, the op callables cached per (scheme,
        # backend, device) by _scheme_ops, no reshape for 2-D x. Same checks, same op calls, same bits
        # as quant_linear; autograd and torch.compile tracing take quant_linear itself.
        if x.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"quantkernels.QuantLinear: input dtype must be float16, bfloat16 or float32, "
                            f"got {x.dtype}")
        K = self.in_features
        nd = x.dim()
        if nd < 1 or x.shape[-1] != K:
            raise ValueError(f"quantkernels.QuantLinear: input must have shape [..., {K}], "
                             f"got {tuple(x.shape)}")
        buf = self._buffers
        qweight = buf["qweight"]
        if x.device != qweight.device:
            raise ValueError(f"quantkernels.QuantLinear: input is on {x.device} but the layer's weights are on "
                             f"{qweight.device}; move one of them (model.to(device))")
        x2 = x if nd == 2 else x.reshape(-1, K)
        input_scale = buf["input_scale"]
        if input_scale is not None:
            x2 = (x2.float() / input_scale).to(x.dtype)
        scale, zero, bias = buf["weight_scale"], buf["weight_zero"], buf["bias"]
        if self.scheme in FLOAT4_SCHEMES:
            # gemm_4bit has its own backward (docs/numerics.md s.10)
            y = _scheme_ops(self.scheme, self.backend, x2.device)[0](
                x2, qweight, scale, self.scheme, self.group_size, buf["nested_absmax"],
                buf["absmax_offset"], bias)
        elif torch.compiler.is_compiling() or _needs_autograd(x2, bias, scale, zero):
            # One op with a backward (docs/numerics.md s.10) when autograd records.
            y = quant_linear(x2, qweight, scale, zero, bias, self.scheme, self.threshold, self.backend)
        else:
            y = _run_scheme(self.scheme, x2, qweight, scale, zero, bias, self.threshold, self.backend)
        return y if nd == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}", f"scheme={self.scheme}"]
        if self.scheme in FLOAT4_SCHEMES:
            parts.append(f"blocksize={self.group_size}, double_quant={self.double_quant}")
        elif self.scheme in INT4_SCHEMES:
            parts.append(f"group_size={self.group_size}")
        else:
            parts.append("group_size=per-channel")
        if self.scheme == "llm_int8":
            parts.append(f"threshold={self.threshold}")
        if self.input_scale is not None:
            parts.append("input_scale=True")
        parts += [f"format={self.weight_format.value}", f"backend={self.backend}"]
        return ", ".join(parts)


def _float4_rows(lin: "QuantLinear", rows: Tensor, packed_rows: Tensor) -> Tensor:
    """fp32 rows ``rows`` of an nf4 / fp4 weight (docs/numerics.md s.11): a block may span rows, so
    each value finds its absmax through its flat index ``row * K + k``."""
    from .reference import CODES_4BIT, _absmax_4bit

    K = lin.in_features
    b = packed_rows.to(torch.int64)
    nib = torch.stack((b >> 4, b & 0xF), dim=-1).reshape(rows.shape[0], K)
    absmax = _absmax_4bit(lin.weight_scale, lin.nested_absmax, lin.absmax_offset)
    flat = rows.unsqueeze(1) * K + torch.arange(K, device=rows.device)
    return CODES_4BIT[lin.scheme].to(packed_rows.device)[nib] * absmax[flat // lin.group_size]


def _embedding_scale(embedding: nn.Module) -> Optional[Tensor]:
    """The factor a scaled word embedding multiplies its rows by (Gemma's ``embed_scale``), None
    for a plain ``nn.Embedding``; raises for an embedding whose forward we cannot reproduce."""
    if type(embedding).forward is nn.Embedding.forward:
        return None
    scale = getattr(embedding, "embed_scale", None)
    if type(embedding).__name__.endswith("ScaledWordEmbedding") and isinstance(scale, Tensor) and scale.numel() == 1:
        return scale
    raise TypeError(f"quantkernels.QuantEmbedding: {type(embedding).__name__} has its own forward; only "
                    f"torch.nn.Embedding and Hugging Face *ScaledWordEmbedding (rows times embed_scale) "
                    f"can be served from quantized rows")


class QuantEmbedding(nn.Module):
    """The input embedding of a model whose ``lm_head`` is tied to it, served from the
    ``QuantLinear`` that replaced the ``lm_head``: row ``i`` of the table is row ``i`` of the
    quantized weight, dequantized on lookup (``q * scale``, or ``(q - zero) * scale`` per group,
    docs/numerics.md s.1-3), cast to the embedding's dtype and, for a scaled word embedding
    (Gemma), multiplied by its ``embed_scale`` in that dtype, as the float module does.

    It holds no weight of its own (the float table is gone, which is the point: for Gemma-3-270M
    it is 640 MiB of the 1,023): the quantized rows stay buffers of the QuantLinear, which is
    kept as a plain attribute (not a submodule), so ``state_dict`` and ``.to()`` see them once.
    Built by ``quantize_model`` when it quantizes a tied ``lm_head``; ``linear`` is
    ``self.linear``.
    """

    def __init__(self, linear: QuantLinear, embedding: nn.Embedding):
        super().__init__()
        if not isinstance(linear, QuantLinear):
            raise TypeError(f"quantkernels.QuantEmbedding: linear must be a QuantLinear, got {type(linear).__name__}")
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"quantkernels.QuantEmbedding: embedding must be a torch.nn.Embedding, "
                            f"got {type(embedding).__name__}")
        if (embedding.num_embeddings, embedding.embedding_dim) != (linear.out_features, linear.in_features):
            raise ValueError(f"quantkernels.QuantEmbedding: embedding [{embedding.num_embeddings}, "
                             f"{embedding.embedding_dim}] does not match the tied linear layer's weight "
                             f"[{linear.out_features}, {linear.in_features}]")
        for attr in ("max_norm", "sparse"):
            if getattr(embedding, attr, None):
                raise ValueError(f"quantkernels.QuantEmbedding: embedding.{attr} = {getattr(embedding, attr)!r} "
                                 f"is not supported (it would rewrite the shared quantized rows)")
        scale = _embedding_scale(embedding)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.dtype = embedding.weight.dtype
        self.source_class = type(embedding).__name__
        self.__dict__["linear"] = linear  # not a submodule: its buffers belong to the lm_head
        self.register_buffer("embed_scale", None if scale is None else scale.detach().clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        # the rows' dtype follows .to(dtype) / .half() like a float embedding's weight would
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.linear.qweight.device))
        super()._apply(fn, recurse)
        self.dtype = probe.dtype
        return self

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"quantkernels.QuantEmbedding: input_ids must be int32 or int64, got {input_ids.dtype}")
        lin = self.linear
        flat = input_ids.reshape(-1).to(lin.qweight.device)
        # Checked on the CPU only: on a GPU it would cost a host sync (index_select asserts there).
        if (flat.device.type == "cpu" and flat.numel() and not torch.compiler.is_compiling()
                and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings)):
            bad = flat[(flat < 0) | (flat >= self.num_embeddings)][0].item()
            raise IndexError(f"quantkernels.QuantEmbedding: index {bad} is out of range for "
                             f"{self.num_embeddings} embeddings")
        q = lin.qweight.index_select(0, flat)
        if lin.scheme in FLOAT4_SCHEMES:
            rows = _float4_rows(lin, flat, q)
        elif lin.scheme in INT4_SCHEMES:
            s = lin.weight_scale.index_select(0, flat)
            z = None if lin.weight_zero is None else lin.weight_zero.index_select(0, flat)
            rows = ops.dequantize_int4(q, s, z, torch.float32)
        else:
            rows = ops.dequantize_int8(q, lin.weight_scale.index_select(0, flat), None, torch.float32)
        rows = rows.to(self.dtype)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(self.dtype)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}, from={self.source_class}, "
                f"rows of the tied QuantLinear (scheme={self.linear.scheme})")
