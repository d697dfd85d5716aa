"""SmoothQuant: QuantLinear.input_scale, folding into norms / linears (float equivalence on
Llama, Gemma-3, BERT and GPT-2 structures), and the W8A8 quality gain on outlier activations."""

import copy
import json

import pytest
import torch
from torch import nn

import quantkernels as qk
from quantkernels import calibration as C
from quantkernels import smoothquant as S

transformers = pytest.importorskip("transformers")


def sqnr(ref, out):
    ref, out = ref.double(), out.double()
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def outlier_inputs(T=128, K=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    x[:, [3, 70, 200]] *= 40      # persistent outlier channels, as in LLM activations
    return x


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "llm_int8", "w8a16", "w4a16"])
def test_input_scale_buffer(scheme):
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(256, 64)
    s = torch.rand(256, generator=g) * 3 + 0.1
    smoothed = copy.deepcopy(lin)
    with torch.no_grad():
        smoothed.weight.mul_(s)
    ql = qk.QuantLinear.from_linear(smoothed, scheme)
    plain = copy.deepcopy(ql)
    assert ql.input_scale is None and "input_scale" not in ql.state_dict()
    ql.input_scale = s
    x = torch.randn(2, 5, 256, generator=g)
    torch.testing.assert_close(ql(x), plain(x / s), rtol=0, atol=0)
    assert "input_scale=True" in repr(ql)
    # state_dict round trip into a module built from the constructor (which has no input_scale)
    fresh = qk.QuantLinear(256, 64, scheme=scheme)
    fresh.load_state_dict(ql.state_dict())
    assert torch.equal(fresh.input_scale, s)
    torch.testing.assert_close(fresh(x), ql(x), rtol=0, atol=0)
    # bf16 activations: the division happens in fp32, the result is rounded once to bf16
    xb = x.bfloat16()
    torch.testing.assert_close(ql(xb), plain((xb.float() / s).bfloat16()), rtol=0, atol=0)


def test_input_scale_under_torch_compile():
    lin = nn.Linear(64, 32)
    ql = qk.QuantLinear.from_linear(lin, "w8a8", backend="reference")
    ql.input_scale = torch.rand(64) + 0.5
    x = torch.randn(5, 64)
    torch.testing.assert_close(torch.compile(ql, fullgraph=True, backend="eager")(x), ql(x), rtol=0, atol=0)


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "gemma3":   # GQA (1 KV head for 4 query heads), (1 + weight) RMSNorm, sandwich norms
        cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                            sliding_window=8, max_position_embeddings=64)
        cfg.layer_types = ["sliding_attention", "full_attention"]
        m = transformers.Gemma3ForCausalLM(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
        m = transformers.BertModel(cfg)
    else:
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128)
        m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():   # non-trivial norm weights, so a wrong fold shows
        for n, p in m.named_parameters():
            if "norm" in n.lower() or "ln" in n:
                p.add_(torch.rand_like(p) * 0.5)
    return m.eval()


def _out(model, ids):
    o = model(ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


EXPECTED_FOLDS = {
    # consumer (relative to a block) -> producer, per architecture
    "gemma3": {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
               "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "pre_feedforward_layernorm",
               "mlp.up_proj": "pre_feedforward_layernorm", "mlp.down_proj": "mlp.up_proj"},  # o_proj: GQA
    "llama": {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
              "self_attn.v_proj": "input_layernorm", "self_attn.o_proj": "self_attn.v_proj",
              "mlp.gate_proj": "post_attention_layernorm", "mlp.up_proj": "post_attention_layernorm",
              "mlp.down_proj": "mlp.up_proj"},
    "bert": {"attention.output.dense": "attention.self.value"},
    "gpt2": {},
}


@pytest.mark.parametrize("kind", ["gemma3", "llama", "bert", "gpt2"])
def test_smoothing_keeps_the_float_model_equivalent(kind):
    model = _tiny(kind)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 16), generator=g) for _ in range(2)]
    ids = torch.randint(0, 128, (2, 16), generator=g)
    with torch.no_grad():
        ref = _out(model, ids)
    stats = C.collect_stats(model, batches, hessian=False, progress=False, layers=C.select_linears(model, None, ()))
    rep = S.smooth_model(model, {n: s.absmax for n, s in stats.items()}, alpha=0.5,
                         layers=list(C.select_linears(model)))
    prefix, blocks = C.find_blocks(model)
    exp = {f"{prefix}.{i}.{c}": f"{prefix}.{i}.{p}" for i in range(len(blocks)) for c, p in EXPECTED_FOLDS[kind].items()}
    assert rep.folded == exp
    assert not set(rep.folded) & set(rep.input_scale)
    assert all(not torch.allclose(rep.scales[n], torch.ones(1)) for n in rep.scales)
    # emulate QuantLinear.input_scale in float: the smoothed model computes the same function
    for n in rep.input_scale:
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, s=rep.scales[n]: (a[0] / s,))
    with torch.no_grad():
        out = _out(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_smoothquant_helps_w8a8_on_outlier_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64))
    with torch.no_grad():
        model[0].weight.mul_(0.3)
    calib = [outlier_inputs(seed=s) for s in range(4)]
    x = outlier_inputs(seed=9)
    with torch.no_grad():
        ref = model(x)
        plain = qk.quantize_model(copy.deepcopy(model), "w8a8")(x)
        sq_model = qk.smoothquant_quantize_model(copy.deepcopy(model), calib, "w8a8", alpha=0.5, progress=False)
        sq = sq_model(x)
    rep = sq_model.quantkernels_report.smoothquant
    assert rep.input_scale == ["0", "1"] and sq_model[0].input_scale is not None
    s_plain, s_sq = sqnr(ref, plain), sqnr(ref, sq)
    assert s_sq > s_plain + 6, (s_sq, s_plain)   # measured: 30.0 -> 40.1 dB


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_smoothquant_quantize_model_on_decoders(kind):
    model = _tiny(kind)
    with torch.no_grad():   # plant outlier channels in the residual stream
        model.model.embed_tokens.weight[:, [5, 17]] *= 30
    g = torch.Generator().manual_seed(0)
    batches = [dict(input_ids=torch.randint(0, 128, (2, 16), generator=g)) for _ in range(4)]
    ids = torch.randint(0, 128, (2, 16), generator=g)
    with torch.no_grad():
        ref = _out(model, ids)
        plain = _out(qk.quantize_model(copy.deepcopy(model), "w8a8"), ids)
        sqm = qk.smoothquant_quantize_model(copy.deepcopy(model), batches, "w8a8", alpha=0.5, progress=False)
        sq = _out(sqm, ids)
    assert sqnr(ref, sq) > sqnr(ref, plain) + 2, (sqnr(ref, sq), sqnr(ref, plain))  # measured +4.0 (llama), +6.4 dB
    assert sqm.quantkernels_report.quantized == qk.quantize_model(copy.deepcopy(model), "w8a8").quantkernels_report.quantized


def test_alpha_range():
    with pytest.raises(ValueError, match="alpha"):
        S.smooth_model(nn.Sequential(nn.Linear(4, 4)), {"0": torch.ones(4)}, alpha=1.5)


def test_gemma_norm_fold_is_one_plus_weight():
    """Gemma3RMSNorm computes norm(x) * (1 + w): folding 1/s must give (1 + w') = (1 + w) / s, not w / s;
    a LLaMA RMSNorm / LayerNorm (weight and bias) is divided by s directly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 64, generator=g)
    s = torch.rand(64, generator=g) * 4 + 0.25
    norms = [transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm(64, eps=1e-6),
             transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-6), nn.LayerNorm(64)]
    for norm in norms:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64, generator=g) * 0.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(torch.randn(64, generator=g))
            ref = norm(x) / s
            S._fold_into(norm, s)
            torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-6)
    w0 = torch.randn(64, generator=g)
    gn = transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm(64)
    with torch.no_grad():
        gn.weight.copy_(w0)
        S._fold_into(gn, s)
    torch.testing.assert_close(gn.weight, (1 + w0) / s - 1)


def test_gemma3_groups_skip_the_sandwich_norms():
    """Gemma-3 blocks: q/k/v read input_layernorm, gate/up read pre_feedforward_layernorm; the
    post-attention / post-feedforward norms feed the residual stream, never a linear layer, so
    nothing is folded into them; o_proj (1 KV head for 4 query heads) keeps input_scale."""
    model = _tiny("gemma3")
    groups = S.smoothing_groups(model)
    producers = {g.producer for g in groups if g.producer}
    assert not any(p.endswith(("post_attention_layernorm", "post_feedforward_layernorm")) for p in producers)
    o = [g for g in groups if g.consumers[0].endswith("o_proj")]
    assert len(o) == 2 and all(g.producer is None for g in o)


def _calib(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(0, 128, (2, 16), generator=g)) for _ in range(n)]


def test_act_absmax_reuse_gives_the_same_model():
    model = _tiny("gemma3")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [5, 17]] *= 30
    batches = _calib()
    stats = C.collect_stats(model, batches, layers=C.select_linears(model, None, ()), hessian=False, progress=False)
    absmax = {n: s.absmax for n, s in stats.items()}
    a = qk.smoothquant_quantize_model(copy.deepcopy(model), batches, "w8a8", alpha=0.6, progress=False)
    b = qk.smoothquant_quantize_model(copy.deepcopy(model), batches, "w8a8", alpha=0.6, progress=False,
                                      act_absmax=absmax)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_choose_alpha_prefers_smoothing_on_outliers_and_none_without():
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(64, 256, generator=g) * 0.05]
    x = outlier_inputs(T=256)
    best, errs = S.choose_alpha(x, x.abs().amax(0), W, scheme="w8a8")
    assert best is not None and errs[best] < errs[None] / 4, errs
    assert set(errs) == {None, *S.AUTO_ALPHAS}
    # no outlier channels and outlier weight columns: smoothing only moves the weights' outliers
    # into the activations; "no smoothing" must be allowed to win
    xs = torch.randn(256, 256, generator=g)
    Wo = torch.randn(64, 256, generator=g) * 0.05
    Wo[:, [1, 2, 3]] *= 50
    best, errs = S.choose_alpha(xs, xs.abs().amax(0), [Wo], scheme="w8a8", candidates=(0.5, 0.8))
    assert errs[best] == min(errs.values())
    with pytest.raises(ValueError, match="alpha"):
        S.smooth_model(nn.Sequential(nn.Linear(4, 4)), {"0": torch.ones(4)}, alpha="best")
    with pytest.raises(ValueError, match="samples"):
        S.smooth_model(nn.Sequential(nn.Linear(4, 4)), {"0": torch.ones(4)}, alpha="auto")


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_auto_alpha_on_decoders(kind):
    """alpha='auto' keeps the float model equivalent (folds are exact) and is at least as good as a
    fixed alpha of the candidate grid on held-out inputs, since it picks per group."""
    model = _tiny(kind)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [5, 17]] *= 30
    batches = _calib(6)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = _out(model, ids)
        plain = _out(qk.quantize_model(copy.deepcopy(model), "w8a8"), ids)
        auto_m = qk.smoothquant_quantize_model(copy.deepcopy(model), batches, "w8a8", alpha="auto", progress=False)
        auto = _out(auto_m, ids)
    rep = auto_m.quantkernels_report.smoothquant
    n_groups = len([g for g in S.smoothing_groups(model)
                    if any(c in auto_m.quantkernels_report.quantized for c in g.consumers)])
    assert len(rep.alphas) == n_groups
    assert all(a is None or a in S.AUTO_ALPHAS for a in rep.alphas.values())
    assert any(a is not None for a in rep.alphas.values())
    assert sqnr(ref, auto) > sqnr(ref, plain) + 2, (sqnr(ref, auto), sqnr(ref, plain))
    # the float model smoothed with the chosen alphas computes the same function
    fm = copy.deepcopy(model)
    stats = C.collect_stats(fm, batches, layers=C.select_linears(fm, None, ()), hessian=False, progress=False)
    groups = S.smoothing_groups(fm)
    samples = S.collect_smoothing_samples(fm, batches, groups)
    frep = S.smooth_model(fm, {n: s.absmax for n, s in stats.items()}, "auto", layers=list(C.select_linears(fm)),
                          samples=samples)
    assert frep.alphas == rep.alphas
    for n in frep.input_scale:
        fm.get_submodule(n).register_forward_pre_hook(lambda m, a, s=frep.scales[n]: (a[0] / s,))
    with torch.no_grad():
        torch.testing.assert_close(_out(fm, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["w8a8", "llm_int8"])
def test_save_load_round_trip_with_input_scale(tmp_path, scheme):
    """save_quantized / load_quantized keep QuantLinear.input_scale (unfolded SmoothQuant scales):
    the reloaded model is bit-identical, and a skeleton without input_scale gets it from the file."""
    model = _tiny("gemma3")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [5, 17]] *= 30
    sq = qk.smoothquant_quantize_model(copy.deepcopy(model), _calib(), scheme, alpha=0.5, progress=False)
    with_scale = [n for n, m in sq.named_modules() if isinstance(m, qk.QuantLinear) and m.input_scale is not None]
    assert with_scale and all(n.endswith("o_proj") for n in with_scale)
    qk.save_quantized(sq, tmp_path)
    cfg = json.loads((tmp_path / "quantization_config.json").read_text())
    assert {n for n, e in cfg["modules"].items() if e["input_scale"]} == set(with_scale)
    with qk.init_empty_weights():
        skeleton = _tiny("gemma3")
    back = qk.load_quantized(skeleton, tmp_path)
    for n in with_scale:
        assert torch.equal(back.get_submodule(n).input_scale, sq.get_submodule(n).input_scale)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(_out(back, ids), _out(sq, ids))
    # a config that claims no input_scale while the file holds one is refused (unexpected tensor)
    cfg["modules"][with_scale[0]]["input_scale"] = False
    (tmp_path / "quantization_config.json").write_text(json.dumps(cfg))
    with qk.init_empty_weights():
        skeleton = _tiny("gemma3")
    with pytest.raises(qk.CheckpointError, match="input_scale"):
        qk.load_quantized(skeleton, tmp_path)
    cfg["modules"][with_scale[0]]["input_scale"] = "yes"
    (tmp_path / "quantization_config.json").write_text(json.dumps(cfg))
    with pytest.raises(qk.CheckpointError, match="input_scale must be true or false"):
        qk.load_quantized(_tiny("gemma3"), tmp_path)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_norm_only_groups(kind):
    """groups='norm' (the SmoothQuant reference code's choice) smooths q/k/v and gate/up only, all
    folded into their norms, and the float model stays equivalent."""
    model = _tiny(kind)
    batches = _calib()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _out(model, ids)
    stats = C.collect_stats(model, batches, layers=C.select_linears(model, None, ()), hessian=False, progress=False)
    rep = S.smooth_model(model, {n: s.absmax for n, s in stats.items()}, 0.5, layers=list(C.select_linears(model)),
                         groups="norm")
    assert not rep.input_scale
    assert {n.split(".", 3)[3] for n in rep.folded} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "mlp.gate_proj", "mlp.up_proj"}
    assert all(p.endswith("layernorm") for p in rep.folded.values())
    with torch.no_grad():
        torch.testing.assert_close(_out(model, ids), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="groups"):
        S.smooth_model(model, {}, 0.5, groups="some")
    # through smoothquant_quantize_model, with alpha="auto": only the norm-fed groups get an alpha
    sq = qk.smoothquant_quantize_model(_tiny(kind), batches, "w8a8", alpha="auto", groups="norm", progress=False)
    rep = sq.quantkernels_report.smoothquant
    assert not rep.input_scale and rep.alphas
    assert {n.split(".", 3)[3] for n in rep.alphas} == {"self_attn.q_proj", "mlp.gate_proj"}
