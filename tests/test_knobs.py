"""The reference layer's knobs against an independent float64 implementation of the formulas.

    y = c (B + s R) act(A x) + b  =  B (c z) + s Expand(c z) + b,   z = act(A x)
    s = alpha / sqrt(K) (variance correction) or alpha;  c = latent_alpha / r or tanh(p) or 1

Every combination of activation x expand x variance correction x trainable alpha x latent
scale x bias x method: forward, every gradient, and the fold (exact, nothing left behind).
"""
import copy
import itertools
import math
import zlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dlr
from dlr.artifacts.model_dir import load_model_dir, read_config, save_model_dir
from dlr.data import load_tokenizer
from dlr.errors import ConfigError
from dlr.hf.lowrank import factorize_projections

D_MODEL, D_FF, RANK = 24, 40, 6
LATENTS = ("none", "fixed", "trainable")


def reference_act(name: str, z: torch.Tensor) -> torch.Tensor:
    # Written from the definitions, not through torch.nn.functional.
    if name == "silu":
        return z / (1 + torch.exp(-z))
    if name == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if name == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    return z


def tiny_decoder(method, activation, expand, vc, trainable_alpha, latent, bias, alpha=1.5, seed=3):
    """One decoder layer's worth of projections (q: d_model -> d_ff-like, down: d_ff -> d_model),
    factorized by the same function the model uses, from a config carrying the knobs."""
    attn = nn.Module()
    attn.q_proj = nn.Linear(D_MODEL, D_FF)
    mlp = nn.Module()
    mlp.down_proj = nn.Linear(D_FF, D_MODEL)
    layers = [SimpleNamespace(self_attn=attn, mlp=mlp)]
    config = SimpleNamespace(
        dlr_method=method, dlr_folded=False, dlr_scope="all", dlr_rank=RANK, dlr_activation=activation,
        dlr_expand=expand, dlr_seed=seed, dlr_alpha=alpha, dlr_variance_correction=vc,
        dlr_trainable_alpha=trainable_alpha, dlr_latent_alpha=2.0 if latent == "fixed" else None,
        dlr_trainable_latent_scale=latent == "trainable", dlr_bias=bias)
    assert factorize_projections(layers, config) == 2
    layers = [attn.q_proj, mlp.down_proj]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            layer.double()
            for p in (layer.A.weight, layer.B.weight):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
            if layer.bias is not None:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
            if layer.has_trainable_latent:
                layer.latent_scale_raw.fill_(0.4)  # as if trained: tanh(0.4), not the initial tanh(1)
            if layer.alpha_divisor is not None:
                layer.dlr_alpha.mul_(0.7).add_(0.2)  # a learned value, not the initial alpha
    return layers, config


def reference_forward(layer, config, x):
    """The formula, in float64, from the layer's tensors and the config's numbers only."""
    k = math.ceil(layer.out_features / RANK)
    z = reference_act(config.dlr_activation, x @ layer.A.weight.T)
    if config.dlr_latent_alpha is not None:
        z = z * (config.dlr_latent_alpha / RANK)
    elif config.dlr_trainable_latent_scale:
        z = z * torch.tanh(layer.latent_scale_raw)
    y = z @ layer.B.weight.T
    if config.dlr_method == "dlr":
        alpha = layer.dlr_alpha if config.dlr_trainable_alpha else config.dlr_alpha
        s = alpha / math.sqrt(k) if config.dlr_variance_correction else alpha
        if config.dlr_expand == "uniform":
            index = torch.arange(layer.out_features) // k
            assert torch.equal(layer.dlr_index, index)
        else:
            index = layer.dlr_index
        y = y + s * z[..., index]
    if config.dlr_bias:
        y = y + layer.bias
    return y


def expected_params(layer, config) -> set[str]:
    names = {"A.weight", "B.weight"}
    if config.dlr_bias:
        names.add("B.bias")
    if config.dlr_method == "dlr" and config.dlr_trainable_alpha:
        names.add("dlr_alpha")
    if config.dlr_trainable_latent_scale:
        names.add("latent_scale_raw")
    return names


COMBOS = list(itertools.product((False, True), (False, True), LATENTS, (False, True)))  # vc, t_alpha, latent, bias


@pytest.mark.parametrize("method", ["lowrank", "dlr"])
@pytest.mark.parametrize("expand", ["uniform", "random_reuse", "permuted"])
@pytest.mark.parametrize("activation", ["silu", "identity", "gelu", "relu"])
def test_every_combination_matches_the_float64_formulas(activation, expand, method):
    for vc, trainable_alpha, latent, bias in COMBOS:
        case = f"{activation} {expand} {method} vc={vc} trainable_alpha={trainable_alpha} latent={latent} bias={bias}"
        layers, config = tiny_decoder(method, activation, expand, vc, trainable_alpha, latent, bias)
        for layer in layers:
            assert {n for n, _ in layer.named_parameters()} == expected_params(layer, config), case
            x = torch.randn(3, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
            w = torch.randn(3, 5, layer.out_features, dtype=torch.float64)
            leaves = [x, *layer.parameters()]
            y = layer(x)
            y_ref = reference_forward(layer, config, x)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12, msg=case)
            grads = torch.autograd.grad((y * w).sum(), leaves)
            grads_ref = torch.autograd.grad((y_ref * w).sum(), leaves)
            for leaf, g, g_ref in zip(["x", *[n for n, _ in layer.named_parameters()]], grads, grads_ref):
                torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11, msg=f"{case}: d/d{leaf}")
            # fp32 through the path training takes (the measured paths for the plain layer)
            y32 = copy.deepcopy(layer).float()(x.detach().float())
            torch.testing.assert_close(y32.double(), y_ref.detach(), rtol=1e-4, atol=1e-4, msg=case)
            # The fold: the learned s and c written into B, nothing training-only left.
            folded = layer.fold_()
            assert folded == (method == "dlr" or latent != "none"), case
            assert {n for n, _ in layer.named_parameters()} == ({"A.weight", "B.weight", "B.bias"} if bias else {"A.weight", "B.weight"}), case
            assert layer.dlr_index is None and "dlr_index" not in dict(layer.named_buffers()), case
            torch.testing.assert_close(layer(x.detach()), y_ref.detach(), rtol=1e-12, atol=1e-12, msg=case)
            assert layer.fold_() is False  # idempotent


def test_fold_is_bit_exact_in_fp32_with_every_knob():
    layers, _ = tiny_decoder("dlr", "gelu", "random_reuse", False, True, "trainable", True)
    for layer in layers:
        layer.float()
        x = torch.randn(4, layer.in_features)
        before = layer(x)
        layer.fold_()
        assert torch.equal(layer(x), before)


def test_general_path_compiles_without_graph_breaks():
    layers, _ = tiny_decoder("dlr", "relu", "random_reuse", True, True, "trainable", True)
    layer = layers[0].float()

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x).float().sum()

    explained = torch._dynamo.explain(step)(torch.randn(2, D_MODEL))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(2, D_MODEL)
    torch.testing.assert_close(compiled(x), layer(x))


# ---------------------------------------------------------------- whole models


def test_whole_decoder_with_every_knob_is_one_graph():
    """compile=auto compiles the decoder as one graph: the knobs must not break it."""
    model = dlr.build_model("llama_tiny", "dlr", activation="gelu", expand="random_reuse", trainable_alpha=True,
                            trainable_latent_scale=True, bias=True)

    def hidden(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.model(input_ids=ids, use_cache=False).last_hidden_state.float().sum()

    explained = torch._dynamo.explain(hidden)(torch.randint(2, 32000, (2, 16)))
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

KNOBS = dict(activation="gelu", expand="random_reuse", variance_correction=False, trainable_alpha=True,
             trainable_latent_scale=True, bias=True, seed=4)


def test_model_stats_count_the_scalars_and_the_fold_removes_them():
    model = dlr.build_model("llama_tiny", "dlr", **KNOBS)
    plain_lowrank = dlr.model_stats(dlr.build_model("llama_tiny", "lowrank")).total_params
    with_bias = dlr.model_stats(dlr.build_model("llama_tiny", "lowrank", bias=True)).total_params
    cfg = model.config
    layers, projections = cfg.num_hidden_layers, 7
    bias = layers * (4 * cfg.hidden_size + 2 * cfg.intermediate_size + cfg.hidden_size)  # q k v o, gate up, down
    assert with_bias - plain_lowrank == bias
    stats = dlr.model_stats(model)
    assert stats.total_params == with_bias + 2 * layers * projections  # one alpha and one latent scale per projection
    assert dlr.fold_model(model) == layers * projections
    folded = dlr.model_stats(model)
    assert folded.total_params == with_bias
    assert folded.forward_flops_per_token == dlr.model_stats(dlr.build_model("llama_tiny", "lowrank", bias=True)).forward_flops_per_token
    # The dense LLaMA gets the same biases (attention_bias / mlp_bias).
    full = dlr.build_model("llama_tiny", "full", bias=True)
    assert full.model.layers[0].self_attn.q_proj.bias is not None and full.model.layers[0].mlp.down_proj.bias is not None


def test_a_lowrank_latent_scale_folds_too():
    model = dlr.build_model("llama_tiny", "lowrank", latent_alpha=8.0)
    assert dlr.model_stats(model).total_params == dlr.model_stats(dlr.build_model("llama_tiny", "lowrank")).total_params
    ids = torch.randint(2, 32000, (1, 8))
    before = model(ids).logits
    assert dlr.fold_model(model) == 14 and model.config.dlr_folded
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert dlr.fold_model(model) == 0


def test_knobs_travel_in_the_model_dir_and_fold_exactly(tmp_path):
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", "dlr", **KNOBS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # learned alphas, scales and biases differ from their init
    tok = load_tokenizer("t5")
    save_model_dir(model, tok, tmp_path / "final")
    cfg = read_config(tmp_path / "final")
    assert (cfg.dlr_expand, cfg.dlr_variance_correction, cfg.dlr_trainable_alpha, cfg.dlr_trainable_latent_scale,
            cfg.dlr_bias, cfg.dlr_activation) == ("random_reuse", False, True, True, True, "gelu")
    loaded, _ = load_model_dir(tmp_path / "final")
    ids = torch.randint(2, 32000, (2, 16))
    model.eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    dlr.fold_model(loaded)
    save_model_dir(loaded, tok, tmp_path / "folded")
    back, _ = load_model_dir(tmp_path / "folded")
    assert back.config.dlr_folded and dlr.model_stats(back).total_params == \
        dlr.model_stats(dlr.build_model("llama_tiny", "lowrank", bias=True)).total_params
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_dlr_fold_cli_verifies_a_model_with_every_knob(tmp_path, capsys):
    from dlr.cli.fold import main as fold_cli

    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", "dlr", **{**KNOBS, "trainable_latent_scale": False}, latent_alpha=8.0)
    save_model_dir(model, load_tokenizer("t5"), tmp_path / "final")
    with pytest.raises(SystemExit) as e:
        fold_cli([f"ckpt={tmp_path / 'final'}", "check_batches=1", "batch_size=1"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    assert "params" in out and "equal" in out and "DIFFERENT" not in out
    folded, _ = load_model_dir(tmp_path / "folded")
    assert folded.config.dlr_folded and not any(n.endswith(("dlr_alpha", "latent_scale_raw", "dlr_index"))
                                                 for n in folded.state_dict())


# ---------------------------------------------------------------- older model directories


def test_a_model_dir_keeps_the_random_reuse_index_it_was_trained_with(tmp_path):
    """The index is in the weights: a directory whose index was drawn otherwise (e.g. by an
    earlier seeding) loads with that index, through dlr and through transformers."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from dlr.artifacts.model_dir import sha256_file

    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", "dlr", expand="random_reuse", seed=2)
    save_model_dir(model, load_tokenizer("t5"), tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    state = load_file(weights)
    gen = torch.Generator().manual_seed(123)
    drawn = {k: torch.randint(0, 16, v.shape, generator=gen) for k, v in state.items() if k.endswith("dlr_index")}
    assert drawn and all(not torch.equal(state[k], v) for k, v in drawn.items())
    save_file({**state, **drawn}, weights, metadata={"format": "pt"})
    meta = json.loads((tmp_path / "d" / "dlr_checkpoint.json").read_text())
    meta["files"]["model.safetensors"] = {"bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    (tmp_path / "d" / "dlr_checkpoint.json").write_text(json.dumps(meta))
    loaded, _ = load_model_dir(tmp_path / "d")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "d", trust_remote_code=False)
    for m in (loaded, hf):
        got = {k: v for k, v in m.state_dict().items() if k.endswith("dlr_index")}
        assert got.keys() == drawn.keys() and all(torch.equal(got[k], drawn[k]) for k in drawn)
    ids = torch.randint(2, 32000, (1, 12))
    torch.testing.assert_close(loaded(ids).logits, hf.eval()(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("kwargs,needle", [
    ({"latent_alpha": -1.0}, "latent_alpha=-1.0"),
    ({"latent_alpha": 4.0, "trainable_latent_scale": True}, "trainable_latent_scale=true"),
    ({"variance_correction": "yes"}, "variance_correction='yes'"),
    ({"bias": 1}, "bias=1"),
    ({"activation": "tanh"}, "gelu, relu"),
    ({"expand": "shuffled"}, "permuted"),
])
def test_bad_knob_values_are_one_line_errors(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        dlr.make_config("llama_tiny", dlr.factorization("dlr", **kwargs))
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- training


def test_training_learns_alpha_and_scale_then_folds_them_away(tmp_path):
    """dlr-train with every scalar knob: alpha and the latent scale move, the fold is exact and leaves none."""
    from dlr.config import from_overrides
    from safetensors.torch import load_file

    from dlr.train.loop import train

    overrides = ["model=llama_tiny", "data=c4_sample", "steps=3", "global_batch=4", "micro_batch=4", "lr=0.05",
                 "data.val_tokens=1000", "data.num_workers=0", "eval_every=3", "save_every=3", "log_every=1",
                 "method=dlr", "activation=relu", "expand=random_reuse", "variance_correction=false",
                 "trainable_alpha=true", "trainable_latent_scale=true", "bias=true", f"out_dir={tmp_path / 'run'}"]
    summary = train(from_overrides("train", overrides))
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    alphas = [t for n, t in weights.items() if n.endswith(".dlr_alpha")]
    scales = [t for n, t in weights.items() if n.endswith(".latent_scale_raw")]
    assert len(alphas) == len(scales) == 14 and all(t.shape == (1,) for t in alphas + scales)
    assert any(float(t) != 1.0 for t in alphas) and any(float(t) != 1.0 for t in scales)  # trained, not frozen
    assert summary["fold_rel_ppl_diff"] < 1e-5
    lowrank_bias = dlr.model_stats(dlr.build_model("llama_tiny", "lowrank", bias=True)).total_params
    assert summary["deploy_params"] == lowrank_bias == summary["train_params"] - 28
    cfg = read_config(tmp_path / "run" / "folded")
    assert cfg.dlr_folded and cfg.dlr_trainable_alpha and cfg.dlr_bias and cfg.dlr_expand == "random_reuse"
