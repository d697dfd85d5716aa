"""Saving and loading quantized models: safetensors (no pickle) plus a JSON quantization config.

    qk.save_quantized(model, "out/")            # out/model.safetensors + out/quantization_config.json
    with qk.init_empty_weights():               # parameters on the meta device: no float weights in memory
        skeleton = build_float_model()
    qk.load_quantized(skeleton, "out/")         # QuantLinear layers filled from the file, never re-quantized

``load_quantized`` validates everything (config, format version, every tensor's name, shape and
dtype) before it changes the model, so a corrupt, truncated or mismatched checkpoint raises
:class:`CheckpointError` with one clear line and leaves the model as it was. Every loader here
returns the model in eval mode, as transformers' ``from_pretrained`` does.

``load_bnb_int8`` imports an 8-bit checkpoint written by bitsandbytes (``Linear8bitLt``: ``weight``
int8 ``[N, K]`` row-wise absmax, ``SCB`` fp32 ``[N]`` = the row absmax) into ``llm_int8``
QuantLinear layers: ``qweight = weight``, ``weight_scale = SCB / 127`` (docs/numerics.md section 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _validate as V
from .formats import WeightFormat
from .nn import SCHEMES, QuantEmbedding, QuantLinear, _is_hf_conv1d, check_threshold, unsupported_reason

FORMAT_NAME = "quantkernels"
#: Bumped whenever the layout of the file or the meaning of a buffer changes. Version 2 adds the
#: integrity checks (per-tensor SHA-256 in the config, the config's SHA-256 in the safetensors
#: metadata); version 1 checkpoints (written before) still load, unverified.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
CHECKSUM_ALGORITHM = "sha256"
#: safetensors metadata key holding the SHA-256 of the quantization config (canonical JSON)
CONFIG_SHA_KEY = "quantkernels_config_sha256"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quantization_config.json"
#: transformers' model config; ``save_quantized`` of a transformers model also writes it, with the
#: same quantization config under ``quantization_config`` (``quant_method`` ``"quantkernels"``)
HF_CONFIG_NAME = "config.json"
#: the name transformers knows our quantizer by (``quantkernels.hf``)
QUANT_METHOD = "quantkernels"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model; the message says why."""


def _err(path, msg: str) -> CheckpointError:
    return CheckpointError(f"quantkernels.load_quantized: {path}: {msg}")


# --------------------------------------------------------------------------- meta skeletons


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Builds modules with their *parameters* on the meta device (no memory), buffers on the CPU.

    Non-persistent buffers (rotary ``inv_freq``, causal masks) are computed in ``__init__`` and
    never saved, so they must stay real; that is why this is not ``with torch.device("meta")``
    (the same rule as ``accelerate.init_empty_weights``)."""
    old = nn.Module.register_parameter

    def register_parameter(module, name, param):
        old(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = old


# --------------------------------------------------------------------------- integrity


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor as stored: its dtype, its shape and its bytes (row-major). A flipped
    bit anywhere in the data, or a relabelled dtype or shape, changes it."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}|{t.numel()}|".encode())
    h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def tensor_checksums(tensors: Mapping[str, Tensor]) -> Dict[str, Any]:
    """The ``checksums`` entry of a config: ``{"algorithm": "sha256", "tensors": {name: hex}}``."""
    return {"algorithm": CHECKSUM_ALGORITHM, "tensors": {k: tensor_sha256(v) for k, v in sorted(tensors.items())}}


def config_sha256(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys, no whitespace): what it says, not how it
    is laid out."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_checksums(tensors: Mapping[str, Tensor], checksums: Any, fail) -> None:
    """Raises ``fail(message)`` unless ``checksums`` (a ``tensor_checksums`` entry) covers exactly
    the tensors of the file and every one matches."""
    if (not isinstance(checksums, dict) or checksums.get("algorithm") != CHECKSUM_ALGORITHM
            or not isinstance(checksums.get("tensors"), dict)):
        raise fail(f"'checksums' must be {{'algorithm': {CHECKSUM_ALGORITHM!r}, 'tensors': {{name: hex}}}}, "
                   f"got {str(checksums)[:120]!r}")
    want = checksums["tensors"]
    if set(want) != set(tensors):
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        raise fail(f"the checksums list other tensors than the file holds (in the file only: {extra[:5]}, "
                   f"in the checksums only: {missing[:5]})")
    for k in sorted(tensors):
        got = tensor_sha256(tensors[k])
        if got != want[k]:
            raise fail(f"tensor {k!r} is damaged: its SHA-256 is {got[:16]}..., the config records "
                       f"{str(want[k])[:16]}... (the file was changed after it was written)")


# --------------------------------------------------------------------------- save


def _module_entry(m: QuantLinear) -> Dict[str, Any]:
    return {"scheme": m.scheme, "weight_format": m.weight_format.value, "group_size": m.group_size,
            "threshold": m.threshold, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "input_scale": m.input_scale is not None,
            **({"double_quant": m.double_quant} if m.double_quant else {})}


def _common(entries: Dict[str, Dict[str, Any]], key: str):
    vals = {json.dumps(e[key]) for e in entries.values()}
    return json.loads(vals.pop()) if len(vals) == 1 else None


def quantization_config(model: nn.Module) -> Dict[str, Any]:
    """The JSON config that ``save_quantized`` writes (without the tensor aliases)."""
    from . import __version__

    modules = {n: _module_entry(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not modules:
        raise ValueError("quantkernels.save_quantized: the model has no QuantLinear layer; "
                         "run quantkernels.quantize_model(model, scheme) first")
    kept: Dict[str, str] = {}
    report = getattr(model, "quantkernels_report", None)
    if report is not None:
        kept.update({n: f"excluded: {why}" for n, why in report.excluded.items()})
        kept.update({n: f"scheme cannot serve it: {why}" for n, why in report.skipped.items()})
    for n, m in model.named_modules():  # float linear layers the report does not know about
        if (isinstance(m, nn.Linear) or _is_hf_conv1d(m)) and n not in kept:
            kept[n] = "not quantized"
    names = {id(m): n for n, m in model.named_modules()}
    tied_embeddings = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            if id(m.linear) not in names:
                raise ValueError(f"quantkernels.save_quantized: embedding {n!r} is served by a QuantLinear that "
                                 f"is not part of this model")
            tied_embeddings[n] = names[id(m.linear)]
    return {
        "quant_method": QUANT_METHOD,  # transformers' key: config.json carries this same dict
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "quantkernels_version": __version__,
        "scheme": _common(modules, "scheme"), "group_size": _common(modules, "group_size"),
        "threshold": _common(modules, "threshold"), "weight_format": _common(modules, "weight_format"),
        "packing": {
            WeightFormat.INT8_PLAIN.value: "int8 [N, K] row-major, one fp32 scale per row",
            WeightFormat.INT4_PLAIN.value: "uint8 [N, K/2], signed nibbles, byte = q[2i] & 0xF | q[2i+1] << 4",
            WeightFormat.UINT4_PLAIN.value: "uint8 [N, K/2], unsigned nibbles + uint8 zero points [N, K/G]"},
        "modules": modules,
        "kept_in_float": kept,
        # embedding -> the quantized (tied lm_head) layer whose rows serve it; it has no tensor of its own
        "tied_embeddings": tied_embeddings,
    }


def _state_dict_dedup(model: nn.Module, to_cpu: bool = True) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(tensors to write, alias -> canonical name) -- safetensors refuses tensors that share memory
    (tied embeddings); each storage is written once and the ties are recorded."""
    tensors: Dict[str, Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[Tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if not isinstance(t, Tensor):
            raise ValueError(f"quantkernels.save_quantized: state_dict entry {name!r} is not a tensor "
                             f"({type(t).__name__}); only tensors can be saved")
        if t.device.type == "meta":
            raise ValueError(f"quantkernels.save_quantized: {name!r} is on the meta device (not loaded)")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous() if to_cpu else t
    return tensors, aliases


def tensor_aliases(model: nn.Module) -> Dict[str, str]:
    """alias -> canonical name of the state_dict entries that share storage (tied weights):
    the ``tied`` entry of the checkpoint config."""
    return _state_dict_dedup(model, to_cpu=False)[1]


def checkpoint_config(model: nn.Module) -> Dict[str, Any]:
    """The whole checkpoint config of ``model``: ``quantization_config(model)`` plus ``tied``."""
    cfg = quantization_config(model)
    cfg["tied"] = tensor_aliases(model)
    return cfg


def save_quantized(model: nn.Module, path: PathLike) -> Path:
    """Writes ``model`` (with its QuantLinear layers) to the directory ``path``:
    ``model.safetensors`` (every tensor of ``state_dict()``, tied tensors once) and
    ``quantization_config.json`` (format version, scheme, group size, threshold, packing, which
    layers are quantized and which stayed in float and why, a SHA-256 per tensor; its own SHA-256
    goes into the safetensors metadata). For a transformers model (one with a
    ``config`` that has ``save_pretrained``) it also writes ``config.json`` with that same dict as
    its ``quantization_config``, so ``AutoModel*.from_pretrained(path)`` loads it after
    ``import quantkernels`` (docs/numerics.md s.9.1). Returns the directory."""
    from safetensors.torch import save_file

    cfg = quantization_config(model)
    tensors, aliases = _state_dict_dedup(model)
    cfg["tied"] = aliases
    cfg["checksums"] = tensor_checksums(tensors)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"quantkernels.save_quantized: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "quantkernels_format_version": str(FORMAT_VERSION),
                                           CONFIG_SHA_KEY: config_sha256(cfg)})
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    hf_config = getattr(model, "config", None)
    if hf_config is not None and callable(getattr(hf_config, "save_pretrained", None)):
        import copy

        hf_config = copy.deepcopy(hf_config)
        hf_config.quantization_config = cfg
        hf_config.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- load


def read_config(path: PathLike) -> Dict[str, Any]:
    """Reads and validates the quantization config of a checkpoint directory: its
    ``quantization_config.json``, or else the ``quantization_config`` entry of its ``config.json``
    (what ``save_pretrained`` of a model loaded with ``QuantKernelsConfig`` writes; the same dict)."""
    p = Path(path)
    cfg_path = p / CONFIG_NAME
    if not p.is_dir():
        raise _err(p, "not a directory (expected a directory written by quantkernels.save_quantized)")
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _err(cfg_path, f"corrupt JSON ({e})") from None
    else:
        cfg = _hf_quantization_config(p)
        if cfg is None:
            raise _err(p, f"no {CONFIG_NAME}, and no config.json with a quantization_config whose quant_method is "
                          f"{FORMAT_NAME!r} (not a quantkernels checkpoint)")
        cfg_path = p / HF_CONFIG_NAME
    validate_config(cfg, cfg_path)
    # save_quantized records a SHA-256 per tensor; transformers' save_pretrained (config.json only) cannot
    if cfg_path.name == CONFIG_NAME and cfg["format_version"] >= 2 and "checksums" not in cfg:
        raise _err(cfg_path, f"format_version {cfg['format_version']} requires 'checksums' (a SHA-256 per tensor), "
                             "which is missing")
    return cfg


def _hf_quantization_config(p: Path) -> Optional[Dict[str, Any]]:
    """``config.json``'s ``quantization_config`` if it is ours, else None."""
    f = p / HF_CONFIG_NAME
    if not f.is_file():
        return None
    try:
        qc = json.loads(f.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise _err(f, f"corrupt JSON ({e})") from None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def validate_config(cfg: Any, where) -> None:
    """Raises CheckpointError (naming ``where``) unless ``cfg`` is a valid checkpoint config."""
    cfg_path = where
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise _err(cfg_path, f"'format' is {cfg.get('format') if isinstance(cfg, dict) else cfg!r}, "
                             f"expected {FORMAT_NAME!r}")
    ver = cfg.get("format_version")
    if ver not in SUPPORTED_VERSIONS:
        raise _err(cfg_path, f"unknown format_version {ver!r}; this quantkernels reads {SUPPORTED_VERSIONS} "
                             f"(a newer quantkernels wrote it?)")
    mods = cfg.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise _err(cfg_path, "'modules' must be a non-empty mapping of layer name -> settings")
    for name, e in mods.items():
        if not isinstance(e, dict):
            raise _err(cfg_path, f"modules[{name!r}] must be a mapping, got {e!r}")
        missing = [k for k in ("scheme", "weight_format", "group_size", "threshold", "in_features",
                               "out_features", "bias") if k not in e]
        if missing:
            raise _err(cfg_path, f"modules[{name!r}] lacks {missing}")
        if e["scheme"] not in SCHEMES:
            raise _err(cfg_path, f"modules[{name!r}]: unknown scheme {e['scheme']!r} (known: {tuple(SCHEMES)})")
        fmt = SCHEMES[e["scheme"]][0].value
        if e["weight_format"] != fmt:
            raise _err(cfg_path, f"modules[{name!r}]: weight_format {e['weight_format']!r} does not match scheme "
                                 f"{e['scheme']!r} (which stores {fmt!r})")
        if not isinstance(e.get("input_scale", False), bool):
            raise _err(cfg_path, f"modules[{name!r}]: input_scale must be true or false, got {e['input_scale']!r}")
        if isinstance(e["threshold"], bool) or not isinstance(e["threshold"], (int, float)) \
                or math.isnan(e["threshold"]) or e["threshold"] < 0:
            raise _err(cfg_path, f"modules[{name!r}]: threshold must be a number >= 0, got {e['threshold']!r}")
        if not isinstance(e["bias"], bool):
            raise _err(cfg_path, f"modules[{name!r}]: bias must be true or false, got {e['bias']!r}")
        if not isinstance(e.get("double_quant", False), bool) or (e.get("double_quant") and e["scheme"] not in
                                                                  ("nf4", "fp4")):
            raise _err(cfg_path, f"modules[{name!r}]: double_quant must be true or false, and true only for nf4 / "
                                 f"fp4, got {e.get('double_quant')!r} with scheme {e['scheme']!r}")
        why = unsupported_reason(e["scheme"], e["in_features"], e["out_features"], e["group_size"]) \
            if all(isinstance(e[k], int) for k in ("in_features", "out_features", "group_size")) \
            else "in_features, out_features and group_size must be integers"
        if why:
            raise _err(cfg_path, f"modules[{name!r}]: {why}")
    if not isinstance(cfg.get("tied", {}), dict):
        raise _err(cfg_path, "'tied' must be a mapping alias -> name")
    te = cfg.get("tied_embeddings", {})
    if not isinstance(te, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in te.items()):
        raise _err(cfg_path, f"'tied_embeddings' must be a mapping embedding name -> layer name, got {te!r}")
    for emb, lin in te.items():
        if lin not in mods:
            raise _err(cfg_path, f"tied_embeddings[{emb!r}] names layer {lin!r}, which 'modules' does not list")


def read_safetensors(f: Path, fail) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(tensors on the CPU, metadata) of one safetensors file; ``fail(message)`` is raised for a
    missing, unreadable, truncated or otherwise corrupt file. Never unpickles."""
    from safetensors import SafetensorError, safe_open

    if not f.is_file():
        raise fail(f"{f}: no such file" if not f.exists() else f"{f} is not a regular file")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            meta = sf.metadata() or {}
            return {k: sf.get_tensor(k) for k in sf.keys()}, dict(meta)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise fail(f"{f}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None


def _merge_files(files: List[Path], fail) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """The tensors (and merged metadata) of several safetensors files; a tensor name in two files is
    refused (which copy is meant cannot be known; a silent last-wins would load either)."""
    out: Dict[str, Tensor] = {}
    where: Dict[str, Path] = {}
    meta: Dict[str, str] = {}
    for f in files:
        t, m = read_safetensors(f, fail)
        for k in t:
            if k in where:
                raise fail(f"tensor {k!r} is stored twice, in {where[k].name} and in {f.name}")
            where[k] = f
        out.update(t)
        meta.update(m)
    return out, meta


def _shard_index(path: Path, index: Path) -> Dict[str, str]:
    """``model.safetensors.index.json``'s weight_map (tensor name -> shard file name), checked: a
    plain file name in ``path`` for every shard (no directories, no ``..``)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
        for k, n in weight_map.items():
            if not isinstance(n, str):
                raise TypeError(f"weight_map[{k!r}] is {n!r}, not a file name")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise _err(index, f"corrupt shard index ({type(e).__name__}: {e})") from None
    for k, n in weight_map.items():
        if n in ("", ".", "..") or Path(n).name != n or "/" in n or "\\" in n:
            raise _err(index, f"shard {n!r} of tensor {k!r} is not a file name in {path}")
    return weight_map


def _read_tensors(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(tensors, safetensors metadata) of a checkpoint: ``model.safetensors``, or the shards that
    ``save_pretrained`` writes for a large model (``model.safetensors.index.json``). Every shard must
    hold exactly the tensors the index assigns to it."""
    fail = lambda msg: CheckpointError(f"quantkernels.load_quantized: {msg}")  # noqa: E731
    f = path / WEIGHTS_NAME
    index = path / (WEIGHTS_NAME + ".index.json")
    if f.exists():  # read_safetensors also names a directory or special file as such
        return read_safetensors(f, fail)
    if not index.is_file():
        raise _err(path, f"no {WEIGHTS_NAME}")
    weight_map = _shard_index(path, index)
    out: Dict[str, Tensor] = {}
    meta: Dict[str, str] = {}
    for name in sorted(set(weight_map.values())):
        t, m = _merge_files([path / name], fail)
        listed = {k for k, n in weight_map.items() if n == name}
        if set(t) != listed:
            extra, absent = sorted(set(t) - listed), sorted(listed - set(t))
            raise _err(path / name, "does not match the shard index: "
                       + "; ".join(([f"holds {extra[:3]} which the index puts elsewhere or nowhere"] if extra else [])
                                   + ([f"lacks {absent[:3]} which the index puts here"] if absent else [])))
        out.update(t)
        meta.update(m)
    return out, meta


def _checkpoint_files(path: Path) -> List[Path]:
    """The safetensors file(s) of a checkpoint directory, as _read_tensors reads them."""
    f = path / WEIGHTS_NAME
    index = path / (WEIGHTS_NAME + ".index.json")
    if f.exists() or not index.is_file():
        return [f]
    return [path / n for n in sorted(set(_shard_index(path, index).values()))]


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_float_dtype(path: PathLike) -> Optional[torch.dtype]:
    """The dtype most float tensors of a checkpoint's unquantized parts (and biases) are stored in,
    read from the safetensors header only; None if there are none. ``load_quantized`` converts
    float tensors to the skeleton's dtype, so a skeleton built in this dtype gets the model as saved."""
    from safetensors import safe_open

    p = Path(path)
    cfg = read_config(p)
    qprefixes = tuple(n + "." for n in cfg["modules"])
    counts: Dict[torch.dtype, int] = {}
    for f in _checkpoint_files(p):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    dt = _SAFETENSORS_FLOATS.get(sf.get_slice(k).get_dtype())
                    if dt is not None and (not k.startswith(qprefixes) or k.endswith(".bias")):
                        counts[dt] = counts.get(dt, 0) + 1
        except Exception as e:
            raise _err(f, f"corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None
    return max(counts, key=counts.get) if counts else None


def _expected_linear_shape(mod: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of an nn.Linear / Conv1D / QuantLinear skeleton layer."""
    if isinstance(mod, QuantLinear) or isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    K, N = mod.weight.shape  # HF Conv1D: weight [in, out]
    return K, N


def build_quant_layers(model: nn.Module, mods: Mapping[str, Dict[str, Any]], backend: str,
                       where) -> Dict[str, QuantLinear]:
    """One QuantLinear on the meta device per entry of a checkpoint's ``modules``, checked against
    the float layer of ``model`` it replaces (kind, shape, bias); nothing in ``model`` changes.
    Raises CheckpointError naming ``where``."""
    new_modules: Dict[str, QuantLinear] = {}
    for name, e in mods.items():
        try:
            old = model.get_submodule(name) if name else model
        except AttributeError:
            raise _err(where, f"the checkpoint quantizes layer {name!r}, which this model does not have "
                              f"(a checkpoint of another model?)") from None
        if not (isinstance(old, (nn.Linear, QuantLinear)) or _is_hf_conv1d(old)):
            raise _err(where, f"layer {name!r} is a {type(old).__name__} in this model, not a linear layer")
        K, N = _expected_linear_shape(old)
        if (K, N) != (e["in_features"], e["out_features"]):
            raise _err(where, f"layer {name!r}: the checkpoint holds [out={e['out_features']}, "
                              f"in={e['in_features']}] but the model's layer is [out={N}, in={K}]")
        old_bias = getattr(old, "bias", None)
        if bool(e["bias"]) != (old_bias is not None):
            raise _err(where, f"layer {name!r}: bias={e['bias']} in the checkpoint, but the model's layer has "
                              f"{'a' if old_bias is not None else 'no'} bias")
        q = QuantLinear(K, N, bias=e["bias"], scheme=e["scheme"], group_size=e["group_size"],
                        threshold=e["threshold"], backend=backend, device="meta",
                        dtype=old_bias.dtype if old_bias is not None else torch.float32,
                        double_quant=e.get("double_quant", False))
        if e.get("input_scale", False):  # SmoothQuant scales that could not be folded (float32 [K])
            q.input_scale = torch.empty(K, dtype=torch.float32, device="meta")
        new_modules[name] = q
    return new_modules


def tied_embedding_modules(model: nn.Module, cfg: Mapping[str, Any], where) -> Dict[str, nn.Embedding]:
    """The float embeddings of ``model`` that the checkpoint serves from a quantized tied layer
    (``tied_embeddings``), checked (kind, shape); raises CheckpointError naming ``where``."""
    mods = cfg["modules"]
    out: Dict[str, nn.Embedding] = {}
    for emb_name, lin_name in cfg.get("tied_embeddings", {}).items():
        try:
            emb = model.get_submodule(emb_name)
        except AttributeError:
            raise _err(where, f"the checkpoint serves embedding {emb_name!r} from {lin_name!r}, but this model "
                              f"has no module {emb_name!r}") from None
        if not isinstance(emb, nn.Embedding):
            raise _err(where, f"{emb_name!r} is a {type(emb).__name__} in this model, not a float embedding "
                              f"(load into the float model skeleton)")
        e = mods[lin_name]
        if (emb.num_embeddings, emb.embedding_dim) != (e["out_features"], e["in_features"]):
            raise _err(where, f"embedding {emb_name!r} is [{emb.num_embeddings}, {emb.embedding_dim}] but the "
                              f"tied layer {lin_name!r} is [out={e['out_features']}, in={e['in_features']}]")
        out[emb_name] = emb
    return out


def load_quantized(model: nn.Module, path: PathLike, *, backend: str = "auto",
                   device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Loads a checkpoint written by :func:`save_quantized` into ``model``, in place, and returns it.

    ``model`` is the float model skeleton (ideally built under :func:`init_empty_weights`, so its
    float weights never occupy memory); the layers the config lists are replaced by QuantLinear
    modules holding the saved tensors as they are (no re-quantization), every other parameter and
    persistent buffer is taken from the file. ``device`` moves the loaded tensors (default: CPU).
    Float tensors (unquantized parameters, buffers, biases) take the dtype of the skeleton's
    tensor they replace, as ``load_state_dict`` would copy them: an fp32 checkpoint loaded into a
    bf16 skeleton gives a bf16 model; the quantized tensors keep their exact dtype and bits.
    Raises :class:`CheckpointError` (a ValueError) before touching the model when anything does
    not match, including a checksum: a checkpoint changed after it was written (a flipped byte in
    a tensor or in the config) is refused.

    After a successful load the model is put in eval mode (``model.eval()``), as transformers'
    ``from_pretrained`` returns it: a skeleton built with ``from_config`` is in training mode, and
    its dropout would otherwise be live. Call ``model.train()`` afterwards to fine-tune."""
    from .dispatch import check_backend

    check_backend(backend)
    if device is not None:
        try:
            torch.empty(0, device=device)
        except Exception as e:  # RuntimeError, or AssertionError from a torch built without CUDA
            raise ValueError(f"quantkernels.load_quantized: device={device!r} cannot hold tensors here "
                             f"({str(e).splitlines()[0]})") from None
    p = Path(path)
    cfg = read_config(p)
    tensors, metadata = _read_tensors(p)
    mods: Dict[str, Dict[str, Any]] = cfg["modules"]
    tied: Dict[str, str] = cfg.get("tied", {})

    # 1. Build every QuantLinear on the meta device, and the full expected state_dict.
    new_modules = build_quant_layers(model, mods, backend, p)
    expected: Dict[str, Tensor] = {}
    for name, q in new_modules.items():
        for k, t in q.state_dict().items():
            expected[f"{name}.{k}" if name else k] = t
    # Embeddings served from a quantized tied lm_head: their float weight is not in the file.
    tied_embeddings: Dict[str, str] = cfg.get("tied_embeddings", {})
    old_embeddings = tied_embedding_modules(model, cfg, p)
    qprefixes = tuple(n + "." for n in mods)
    emb_weights = {n + ".weight" for n in tied_embeddings}
    for k, t in model.state_dict(keep_vars=True).items():
        if not k.startswith(qprefixes) and k not in emb_weights:
            expected[k] = t

    # 2. Every expected tensor is in the file (or tied), nothing else is, shapes and dtypes match.
    stored = dict(tensors)  # as in the file, for the checksums
    for alias, canon in tied.items():
        if canon not in tensors:
            raise _err(p, f"tied tensor {alias!r} refers to {canon!r}, which the file lacks")
        tensors = dict(tensors)
        tensors[alias] = tensors[canon]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) the model needs: {missing[:5]}"
                         + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) this model has no place for: {unexpected[:5]}"
                         + (" ..." if len(unexpected) > 5 else ""))
        raise _err(p, "; ".join(parts) + " (a checkpoint of another model, or of another scheme?)")
    for k, ref in expected.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise _err(p, f"tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        quant = k.startswith(qprefixes) and not k.endswith(".bias")
        if quant and t.dtype != ref.dtype:
            raise _err(p, f"tensor {k!r} has dtype {t.dtype}, expected {ref.dtype} "
                          f"(scheme {mods[k.rpartition('.')[0]]['scheme']})")
        if not quant and t.is_floating_point() != ref.is_floating_point():
            raise _err(p, f"tensor {k!r} has dtype {t.dtype}, the model's is {ref.dtype}")
    leftover = [n for n, b in model.named_buffers() if b.device.type == "meta" and n not in expected]
    if leftover:
        raise _err(p, f"buffer(s) {leftover[:3]} of the model are on the meta device and not in the checkpoint "
                      f"(non-persistent); build the skeleton with quantkernels.init_empty_weights(), which "
                      f"keeps buffers real")
    # 2b. Integrity (format version 2): the config is the one written with this file, every tensor's
    #     bytes are the ones written.
    if "checksums" in cfg or CONFIG_SHA_KEY in metadata:  # save_quantized wrote it (see read_config)
        if metadata.get(CONFIG_SHA_KEY) != config_sha256(cfg):
            raise _err(p, f"{CONFIG_NAME} does not belong to {WEIGHTS_NAME} or was changed after it was written "
                          f"(its SHA-256 differs from the one recorded in the safetensors metadata)")
    if "checksums" in cfg:
        verify_checksums(stored, cfg["checksums"], lambda msg: _err(p, msg))
    # Float tensors take the skeleton's dtype (as load_state_dict copies into it): an fp32 checkpoint
    # loaded into a bf16 skeleton gives a bf16 model. Quantized tensors keep theirs (checked above).
    for k, ref in expected.items():
        t = tensors[k]
        if t.is_floating_point() and t.dtype != ref.dtype and not (k.startswith(qprefixes)
                                                                    and not k.endswith(".bias")):
            tensors[k] = t.to(ref.dtype)

    # 3. Commit: swap the layers in, then assign every tensor (no copy into meta storage).
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    for name, q in new_modules.items():
        q.load_state_dict({k[len(name) + 1:] if name else k: tensors[k]
                           for k in expected if k.startswith(name + ".")}, strict=True, assign=True)
    previous = {}
    try:
        for name, q in new_modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            previous[name] = getattr(parent, child)
            setattr(parent, child, q)
        for emb_name, lin_name in tied_embeddings.items():
            old = old_embeddings[emb_name]
            parent_name, _, child = emb_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            previous[emb_name] = old
            setattr(parent, child, QuantEmbedding(new_modules[lin_name], old))
        rest = {k: tensors[k] for k in expected if not k.startswith(qprefixes)}
        model.load_state_dict(rest, strict=False, assign=True)
    except Exception:
        for name, old in previous.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, old)
        raise
    _retie(model, tied)
    from .convert import QuantizationReport

    report = QuantizationReport(cfg.get("scheme") or "mixed", quantized=list(mods))
    report.excluded.update(cfg.get("kept_in_float", {}))
    report.tied_embeddings.update(tied_embeddings)
    model.quantkernels_report = report
    return model.eval()  # inference mode, as from_pretrained: no live dropout


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Makes each alias the very same Parameter as its canonical tensor (as the model had it)."""
    for alias, canon in tied.items():
        a_mod, _, a_leaf = alias.rpartition(".")
        c_mod, _, c_leaf = canon.rpartition(".")
        am, cm = model.get_submodule(a_mod), model.get_submodule(c_mod)
        if a_leaf in cm._parameters and a_leaf in am._parameters:
            am._parameters[a_leaf] = cm._parameters[c_leaf]
        elif c_leaf in cm._buffers and a_leaf in am._buffers:
            am._buffers[a_leaf] = cm._buffers[c_leaf]


# --------------------------------------------------------------------------- bitsandbytes import


def _bnb_state_dict(source, op: str = "load_bnb_int8") -> Tuple[Dict[str, Tensor], Optional[float], List[str]]:
    """(tensors, llm_int8_threshold from config.json or None, skip modules) of a bnb checkpoint."""
    if isinstance(source, Mapping):
        out = dict(source)
        not_tensors = sorted(k for k, v in out.items() if not isinstance(v, Tensor))
        if not_tensors:
            raise CheckpointError(f"quantkernels.{op}: {not_tensors[:5]} are not tensors "
                                  f"(got {type(out[not_tensors[0]]).__name__})")
        return out, None, []
    p = Path(source)
    threshold, skip = None, []
    if p.is_dir():
        cfg_file = p / "config.json"
        if cfg_file.is_file():
            try:
                qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
                threshold = qc.get("llm_int8_threshold")
                skip = list(qc.get("llm_int8_skip_modules") or [])
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
                raise CheckpointError(f"quantkernels.{op}: {cfg_file}: unreadable or corrupt JSON "
                                      f"({type(e).__name__}: {e})") from None
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"quantkernels.{op}: no *.safetensors file in {p}")
    elif p.is_file():
        files = [p]
    else:
        raise CheckpointError(f"quantkernels.{op}: {p} does not exist")
    out = _merge_files(files, lambda msg: CheckpointError(f"quantkernels.{op}: {msg}"))[0]
    return out, threshold, skip


#: The tensors bitsandbytes' ``Linear8bitLt`` saves per layer (``weight_format``: legacy, optional).
BNB_LAYER_KEYS = ("weight", "SCB", "bias", "weight_format")


def _bnb_fail(msg: str) -> CheckpointError:
    return CheckpointError(f"quantkernels.load_bnb_int8: {msg}")


def bnb_int8_to_quantlinear(weight: Tensor, SCB: Tensor, bias: Optional[Tensor] = None, *,
                            threshold: float = 6.0, backend: str = "auto") -> QuantLinear:
    """One bitsandbytes ``Linear8bitLt`` (``weight`` int8 [N, K], ``SCB`` fp32 [N] row absmax) as an
    ``llm_int8`` QuantLinear: the int8 values are kept as they are, ``weight_scale = SCB / 127``.
    ``SCB`` must be a float tensor of finite values >= 0 (0: an all-zero row), ``bias`` a float [N]."""
    if not isinstance(weight, Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
        raise _bnb_fail(f"weight must be int8 [N, K], got {_describe(weight)}")
    N, K = weight.shape
    if not isinstance(SCB, Tensor) or not SCB.is_floating_point() or tuple(SCB.shape) != (N,):
        raise _bnb_fail(f"SCB must be a float tensor of shape ({N},) for weight {tuple(weight.shape)}, "
                        f"got {_describe(SCB)}")
    if N and not bool((torch.isfinite(SCB) & (SCB >= 0)).all()):
        bad = SCB[~(torch.isfinite(SCB) & (SCB >= 0))]
        raise _bnb_fail(f"SCB (the row absmax) must be finite and >= 0, got {bad.reshape(-1)[0].item()!r} "
                        f"({bad.numel()} such value(s))")
    if bias is not None and (not isinstance(bias, Tensor) or not bias.is_floating_point()
                             or tuple(bias.shape) != (N,)):
        raise _bnb_fail(f"bias must be a float tensor of shape ({N},), got {_describe(bias)}")
    if weight.numel() and int(weight.min()) < -127:
        raise _bnb_fail("weight holds -128, outside the [-127, 127] range of row-wise absmax quantization")
    scb = SCB.float()
    scale = torch.where(scb == 0, torch.ones_like(scb), scb / torch.full((), 127.0))
    q = QuantLinear(K, N, bias=bias is not None, scheme="llm_int8", threshold=threshold, backend=backend,
                    device="meta", dtype=bias.dtype if bias is not None else torch.float32)
    sd = {"qweight": weight.contiguous(), "weight_scale": scale.contiguous()}
    if bias is not None:
        sd["bias"] = bias
    q.load_state_dict(sd, strict=True, assign=True)
    return q


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def _bnb_weight_format(name: str, fmt: Tensor) -> None:
    """The legacy ``<layer>.weight_format``: one integer, 0 (row-major); bitsandbytes writes a uint8
    scalar. Anything else (another layout, empty, several values, a float, NaN) is refused."""
    if fmt.is_floating_point() or fmt.is_complex() or fmt.dtype == torch.bool or fmt.numel() != 1:
        raise _bnb_fail(f"{name}.weight_format must hold one integer (bitsandbytes writes a uint8 scalar, 0 = "
                        f"row-major), got {_describe(fmt)}")
    v = int(fmt.reshape(-1)[0])
    if v != 0:
        raise _bnb_fail(f"{name}.weight_format = {v}: only the row-major layout (0) is supported "
                        f"(turing/ampere tile layouts are not)")


def load_bnb_int8(model: nn.Module, source, *, threshold: Optional[float] = None,
                  backend: str = "auto") -> nn.Module:
    """Loads an 8-bit bitsandbytes checkpoint into the float skeleton ``model`` (in place).

    ``source``: a Hugging Face model directory saved with ``load_in_8bit`` (``*.safetensors`` +
    ``config.json``), one ``.safetensors`` file, or a state dict. Every layer with ``<name>.SCB``
    becomes an ``llm_int8`` QuantLinear (threshold from ``config.json``'s ``llm_int8_threshold``
    unless given, else 6.0); all other tensors load as they are (float tensors in the skeleton's
    float dtype, as ``load_quantized``). The legacy ``<name>.weight_format`` entries must say
    row-major (0). Validates everything (names, shapes, dtypes, SCB finite and >= 0, a bias where
    the model's layer has one) before changing the model: a damaged checkpoint raises
    :class:`CheckpointError` and leaves the model as it was.
    Returns the model in eval mode (``model.eval()``), as ``from_pretrained`` does."""
    from .dispatch import check_backend

    check_backend(backend)
    if threshold is not None:
        check_threshold("load_bnb_int8", threshold)
    tensors, cfg_thr, _ = _bnb_state_dict(source)
    if threshold is None and cfg_thr is not None:
        try:
            check_threshold("load_bnb_int8", cfg_thr)
        except ValueError as e:
            raise CheckpointError(f"{e} (llm_int8_threshold in config.json)") from None
    thr = float(threshold if threshold is not None else (cfg_thr if cfg_thr is not None else 6.0))
    layers = sorted(k[: -len(".SCB")] for k in tensors if k.endswith(".SCB"))
    if not layers:
        raise _bnb_fail("no '<layer>.SCB' tensor: not an 8-bit bitsandbytes checkpoint")
    new: Dict[str, QuantLinear] = {}
    for name in layers:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise _bnb_fail(f"the checkpoint has layer {name!r}, which this model does not have") from None
        if not (isinstance(old, (nn.Linear, QuantLinear)) or _is_hf_conv1d(old)):
            raise _bnb_fail(f"the checkpoint quantizes {name!r}, a {type(old).__name__} in this model, "
                            f"not a linear layer")
        fmt = tensors.get(f"{name}.weight_format")
        if fmt is not None:
            _bnb_weight_format(name, fmt)
        w = tensors.get(f"{name}.weight")
        if w is None:
            raise _bnb_fail(f"{name}.SCB without {name}.weight")
        K, N = _expected_linear_shape(old)
        if tuple(w.shape) != (N, K):
            raise _bnb_fail(f"{name}.weight has shape {tuple(w.shape)}, the model's layer is [out={N}, in={K}]")
        old_bias = getattr(old, "bias", None)
        bias = tensors.get(f"{name}.bias")
        if (bias is None) != (old_bias is None):
            raise _bnb_fail(f"layer {name!r}: the checkpoint has {'no' if bias is None else 'a'} bias, the "
                            f"model's layer has {'a' if old_bias is not None else 'no'} bias")
        if bias is not None and bias.is_floating_point() and old_bias.is_floating_point():
            bias = bias.to(old_bias.dtype)
        new[name] = bnb_int8_to_quantlinear(w, tensors[f"{name}.SCB"], bias, threshold=thr, backend=backend)
    return _install_bnb_layers(model, tensors, new, "load_bnb_int8", "llm_int8", BNB_LAYER_KEYS)


def _install_bnb_layers(model: nn.Module, tensors: Mapping[str, Tensor], new: Dict[str, QuantLinear], op: str,
                        scheme: str, layer_keys: Tuple[str, ...]) -> nn.Module:
    """Checks the non-quantized rest of a bitsandbytes checkpoint against ``model`` (and that each
    quantized layer holds only ``layer_keys``), then swaps the QuantLinear layers ``new`` in and
    loads the rest: nothing changes before every check passed, and a failing commit is rolled back."""

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"quantkernels.{op}: {msg}")

    layers = sorted(new)
    prefixes = tuple(n + "." for n in layers)
    # quantized layers are leaf modules: a key under one belongs to exactly that layer
    stray = sorted(k for k in tensors if k.startswith(prefixes)
                   and not any(k.startswith(n + ".") and k[len(n) + 1:] in layer_keys for n in layers))
    if stray:
        raise fail(f"unexpected {stray[:5]} (a quantized layer holds only {list(layer_keys)})")
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    missing = sorted(set(expected) - set(rest))
    tied_names = [k for k in missing if k.endswith("lm_head.weight")]
    missing = [k for k in missing if k not in tied_names]
    unexpected = sorted(set(rest) - set(expected))
    if missing or unexpected:
        raise fail(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in rest.items():
        ref = expected[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise fail(f"{k} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
        if v.is_floating_point() != ref.is_floating_point() or (not v.is_floating_point() and v.dtype != ref.dtype):
            raise fail(f"{k} has dtype {v.dtype}, the model's is {ref.dtype}")
        if v.is_floating_point() and v.dtype != ref.dtype:
            rest[k] = v.to(ref.dtype)  # the skeleton's float dtype, as load_quantized
    # Commit. Everything above is checked, so this does not fail; if it does anyway, every module,
    # parameter and buffer is put back as it was.
    saved = {m: (dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()}
    try:
        for name, q in new.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        model.load_state_dict(rest, strict=False, assign=True)
        if tied_names and hasattr(model, "tie_weights"):
            model.tie_weights()
    except Exception:
        for m, (params, buffers, modules) in saved.items():
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            m._modules.clear()
            m._modules.update(modules)
        raise
    from .convert import QuantizationReport

    model.quantkernels_report = QuantizationReport(scheme, quantized=layers)
    return model.eval()  # inference mode, as from_pretrained: no live dropout


_BNB4_STATE = ".weight.quant_state.bitsandbytes__"
#: The tensors bitsandbytes' ``Linear4bit`` saves per layer (the nested ones with double quantization).
BNB4_LAYER_KEYS = ("weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                   "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                   "weight.quant_state.bitsandbytes__fp4")


#: quant_state ``dtype`` values (the layer's float dtype as bitsandbytes writes it).
_BNB4_DTYPES = ("float32", "float16", "bfloat16")


def _bnb4_finite_nonneg(t: Tensor, what: str, fail) -> None:
    """A block absmax (or the nested one) is finite and >= 0 (0: an all-zero block)."""
    ok = torch.isfinite(t) & (t >= 0)
    if not bool(ok.all()):
        bad = t[~ok]
        raise fail(f"{what} must be finite and >= 0, got {bad.reshape(-1)[0].item()!r} ({bad.numel()} such value(s))")


def _bnb4_layer(name: str, qt: str, tensors: Mapping[str, Tensor], K: int, N: int, backend: str) -> QuantLinear:
    """One bitsandbytes ``Linear4bit`` of a checkpoint as an nf4 / fp4 QuantLinear, its bytes as they
    are (docs/numerics.md s.11); raises CheckpointError for anything s.11 cannot represent."""
    from .reference import CODES_4BIT, DYNAMIC_CODE, NESTED_BLOCKSIZE

    def fail(msg):
        return CheckpointError(f"quantkernels.load_bnb_4bit: layer {name!r}: {msg}")

    def get(key):
        t = tensors.get(f"{name}.{key}")
        if t is None:
            raise fail(f"the checkpoint has no {name}.{key}")
        return t

    raw = get(f"weight.quant_state.bitsandbytes__{qt}")
    try:
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise ValueError(f"a {raw.dtype} tensor of shape {tuple(raw.shape)}, not 1-D uint8")
        st = json.loads(bytes(raw.tolist()).decode("utf-8"))
        if not isinstance(st, dict):
            raise ValueError(f"JSON {type(st).__name__}, not an object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise fail(f"unreadable quant_state ({type(e).__name__}: {str(e)[:200]})") from None
    if st.get("quant_type") != qt:
        raise fail(f"quant_state says quant_type {st.get('quant_type')!r} under the key of {qt!r}")
    bs = st.get("blocksize")
    if type(bs) is not int or bs not in V.BLOCKSIZES_4BIT:
        raise fail(f"blocksize {bs!r} is not one of {V.BLOCKSIZES_4BIT}")
    if st.get("shape") != [N, K]:
        raise fail(f"quant_state shape {st.get('shape')!r}, but the model's layer is [out={N}, in={K}]")
    if st.get("dtype") not in _BNB4_DTYPES:
        raise fail(f"quant_state dtype {st.get('dtype')!r} is not one of {_BNB4_DTYPES}")
    if K % 2:
        raise fail(f"in_features = {K} is odd: bitsandbytes packs such a weight across rows, which the "
                   f"[N, K/2] layout of s.11 cannot represent")
    w = get("weight")
    if w.dtype != torch.uint8:
        raise fail(f"weight is {w.dtype}: only bitsandbytes' default quant_storage=torch.uint8 is supported")
    if w.numel() != N * K // 2:
        raise fail(f"weight holds {w.numel()} bytes, [{N}, {K}] needs {N * K // 2}")
    qmap = get("weight.quant_map")
    if qmap.dtype != torch.float32 or qmap.shape != (16,) or not torch.equal(qmap, CODES_4BIT[qt]):
        raise fail(f"quant_map is not bitsandbytes' {qt} table (s.11.1): a custom code cannot be represented")
    nb = -(-(N * K) // bs)
    absmax = get("weight.absmax")
    nested = "nested_offset" in st or f"{name}.weight.nested_absmax" in tensors
    sd = {"qweight": w.reshape(N, K // 2).contiguous()}
    if nested:
        if st.get("nested_blocksize") != NESTED_BLOCKSIZE:
            raise fail(f"nested_blocksize {st.get('nested_blocksize')!r}; only {NESTED_BLOCKSIZE} is supported")
        if st.get("nested_dtype") != "float32":
            raise fail(f"nested_dtype {st.get('nested_dtype')!r}; bitsandbytes writes 'float32'")
        off = st.get("nested_offset")
        # the offset is the mean of the (>= 0) block absmax: a finite number >= 0
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not (math.isfinite(off) and off >= 0):
            raise fail(f"nested_offset must be a finite number >= 0, got {off!r}")
        n2 = get("weight.nested_absmax")
        nmap = get("weight.nested_quant_map")
        if nmap.dtype != torch.float32 or nmap.shape != (256,) or not torch.equal(nmap, DYNAMIC_CODE):
            raise fail("nested_quant_map is not bitsandbytes' 8-bit dynamic map (s.11.5)")
        if absmax.dtype != torch.uint8 or absmax.shape != (nb,):
            raise fail(f"absmax must be uint8 [{nb}] under double quantization, got {absmax.dtype} "
                       f"{tuple(absmax.shape)}")
        if n2.dtype != torch.float32 or n2.shape != (-(-nb // NESTED_BLOCKSIZE),):
            raise fail(f"nested_absmax must be float32 [{-(-nb // NESTED_BLOCKSIZE)}], got {n2.dtype} "
                       f"{tuple(n2.shape)}")
        _bnb4_finite_nonneg(n2, "nested_absmax", fail)
        sd.update(weight_scale=absmax.contiguous(), nested_absmax=n2.contiguous(),
                  absmax_offset=torch.tensor(off, dtype=torch.float32))
    else:
        if absmax.dtype != torch.float32 or absmax.shape != (nb,):
            raise fail(f"absmax must be float32 [{nb}], got {absmax.dtype} {tuple(absmax.shape)}")
        stray = [k for k in ("weight.nested_quant_map",) if f"{name}.{k}" in tensors]
        if stray:
            raise fail(f"{name}.{stray[0]} in a layer without double quantization (no nested_offset, "
                       f"no nested_absmax)")
        _bnb4_finite_nonneg(absmax, "absmax", fail)
        sd["weight_scale"] = absmax.contiguous()
    bias = tensors.get(f"{name}.bias")
    if bias is not None:
        sd["bias"] = bias
    q = QuantLinear(K, N, bias=bias is not None, scheme=qt, group_size=bs, backend=backend, device="meta",
                    dtype=bias.dtype if bias is not None else torch.float32, double_quant=nested)
    q.load_state_dict(sd, strict=True, assign=True)
    return q


def load_bnb_4bit(model: nn.Module, source, *, backend: str = "auto") -> nn.Module:
    """Loads a 4-bit bitsandbytes checkpoint (``load_in_4bit``, NF4 or FP4, with or without double
    quantization) into the float skeleton ``model`` (in place), without re-quantizing.

    ``source``: a Hugging Face model directory (``*.safetensors``), one ``.safetensors`` file, or a
    state dict. Every layer with ``<name>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``)
    becomes an nf4 / fp4 QuantLinear holding the checkpoint's packed codes, ``absmax`` (and
    ``nested_absmax`` / ``nested_offset``) bit for bit (docs/numerics.md s.9.4, s.11); all other
    tensors load as they are. Refused with CheckpointError: odd in_features, a quant_storage other
    than uint8, custom code tables, a nested block size other than 256, a non-finite or negative
    absmax / nested absmax / nested offset, a quant_state that is not the JSON bitsandbytes writes,
    and any tensor whose dtype or shape does not match. Never unpickles. Validates everything before
    changing the model and returns it in eval mode."""
    from .dispatch import check_backend

    check_backend(backend)
    tensors, _, _ = _bnb_state_dict(source, "load_bnb_4bit")
    found = {}
    for k in tensors:
        if _BNB4_STATE in k:
            name, _, qt = k.partition(_BNB4_STATE)
            if qt not in ("nf4", "fp4"):
                raise CheckpointError(f"quantkernels.load_bnb_4bit: {k}: unknown 4-bit type {qt!r} (nf4, fp4)")
            if name in found:
                raise CheckpointError(f"quantkernels.load_bnb_4bit: layer {name!r} has two quant_state entries")
            found[name] = qt
    if not found:
        raise CheckpointError("quantkernels.load_bnb_4bit: no '<layer>.weight.quant_state.bitsandbytes__nf4' (or "
                              "__fp4) tensor: not a 4-bit bitsandbytes checkpoint")
    new: Dict[str, QuantLinear] = {}
    for name, qt in sorted(found.items()):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantkernels.load_bnb_4bit: the checkpoint has layer {name!r}, "
                                  f"which this model does not have") from None
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise CheckpointError(f"quantkernels.load_bnb_4bit: layer {name!r} is a {type(old).__name__} in this "
                                  f"model, not a torch.nn.Linear")
        K, N = _expected_linear_shape(old)
        bias = tensors.get(f"{name}.bias")
        if (bias is None) != (getattr(old, "bias", None) is None):
            raise CheckpointError(f"quantkernels.load_bnb_4bit: layer {name!r}: the checkpoint has "
                                  f"{'no' if bias is None else 'a'} bias, the model's layer has "
                                  f"{'no' if getattr(old, 'bias', None) is None else 'a'} bias")
        if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (N,)):
            raise CheckpointError(f"quantkernels.load_bnb_4bit: layer {name!r}: bias must be a float tensor of "
                                  f"shape ({N},), got {bias.dtype} {tuple(bias.shape)}")
        new[name] = _bnb4_layer(name, qt, tensors, K, N, backend)
    schemes = sorted(set(found.values()))
    return _install_bnb_layers(model, tensors, new, "load_bnb_4bit", schemes[0] if len(schemes) == 1 else "mixed",
                               BNB4_LAYER_KEYS)
