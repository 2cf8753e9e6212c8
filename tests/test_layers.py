"""The DLR residual through B + sR equals the explicit expansion; the training path adds no memory."""
import hashlib
import math

import pytest
import torch

from dlr.hf.lowrank import LowRankLinear, cola_init_std, expand_index, expansion_factor
from dlr.train.layer_paths import TrainingLowRankLinear, apply_training_paths


def explicit_dlr(layer: LowRankLinear, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y = B z + (alpha/sqrt K) Expand_K(z), the expansion materialised per token."""
    z = torch.nn.functional.silu(x @ layer.A.weight.T)
    return z @ layer.B.weight.T + layer.dlr_scale * z[..., index]


def make_layer(d_in, d_out, rank, mode="uniform", alpha=1.0, seed=0):
    index = expand_index(d_out, rank, mode, seed, "model.layers.0.self_attn.q_proj")
    scale = alpha / math.sqrt(expansion_factor(d_out, rank))
    layer = LowRankLinear(d_in, d_out, rank, "silu", scale, index)
    torch.nn.init.normal_(layer.A.weight, std=cola_init_std(d_in, d_out, rank))
    torch.nn.init.normal_(layer.B.weight, std=cola_init_std(d_in, d_out, rank))
    return layer.double(), index


def test_uniform_index_is_contiguous_duplication_truncated():
    # d_out=10, r=4 -> K=3: outputs 0-2 read latent 0, 3-5 latent 1, 6-8 latent 2, 9 latent 3.
    assert expand_index(10, 4, "uniform", 0, "x").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    z = torch.arange(4.0)
    assert torch.equal(z.repeat_interleave(3)[:10], z[expand_index(10, 4, "uniform", 0, "x")])


def test_permuted_index_is_seeded_and_balanced():
    a = expand_index(176, 16, "permuted", 3, "1.up_proj")
    assert torch.equal(a, expand_index(176, 16, "permuted", 3, "1.up_proj"))
    assert not torch.equal(a, expand_index(176, 16, "permuted", 4, "1.up_proj"))
    assert not torch.equal(a, expand_index(176, 16, "uniform", 3, "1.up_proj"))
    assert torch.equal(torch.bincount(a, minlength=16), torch.bincount(expand_index(176, 16, "uniform", 0, "x"), minlength=16))


def reference_random_reuse(d_out: int, rank: int, seed: int, name: str) -> torch.Tensor:
    """The authors' reference index, written out from its definition."""
    key = int.from_bytes(hashlib.md5(name.encode("utf-8")).digest()[:8], "little")
    g = torch.Generator(device="cpu")
    g.manual_seed((seed ^ key) % (2**63 - 1))
    return torch.randint(0, rank, (d_out,), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**40 + 7])
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"])
def test_random_reuse_is_the_reference_index(seed, name):
    assert torch.equal(expand_index(176, 16, "random_reuse", seed, name), reference_random_reuse(176, 16, seed, name))


def test_a_built_random_reuse_model_carries_the_reference_index_per_module():
    import dlr

    model = dlr.build_model("llama_tiny", "dlr", rank=8, expand="random_reuse", seed=3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(layers) == 7 * model.config.num_hidden_layers
    for name, m in layers.items():
        assert torch.equal(m.dlr_index, reference_random_reuse(m.out_features, 8, 3, name)), name


def test_random_reuse_draws_with_replacement_seeded_by_seed_and_module_name():
    name = "model.layers.1.mlp.up_proj"
    a = expand_index(64, 8, "random_reuse", 3, name)
    assert a.dtype == torch.long and a.shape == (64,) and int(a.min()) >= 0 and int(a.max()) < 8
    assert torch.equal(a, expand_index(64, 8, "random_reuse", 3, name))
    assert not torch.equal(a, expand_index(64, 8, "random_reuse", 4, name))
    assert not torch.equal(a, expand_index(64, 8, "random_reuse", 3, "model.layers.1.mlp.down_proj"))
    # With replacement: multiplicities vary (the uniform ones are all K = 4),
    # and some latent feeds no output somewhere (the reference's ablation, not a permutation).
    counts = [torch.bincount(expand_index(64, 16, "random_reuse", s, name), minlength=16) for s in range(20)]
    assert any(len(set(c.tolist())) > 1 for c in counts)
    assert any(int(c.min()) == 0 for c in counts)


@pytest.mark.parametrize("mode", ["uniform", "random_reuse", "permuted"])
@pytest.mark.parametrize("d_in,d_out,rank", [(64, 176, 16), (176, 64, 16), (64, 64, 24)])
def test_effective_weight_matches_explicit_expansion(mode, d_in, d_out, rank):
    layer, index = make_layer(d_in, d_out, rank, mode, alpha=0.7)
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    grad_out = torch.randn(3, 5, d_out, dtype=torch.float64)

    y = layer(x)
    (y * grad_out).sum().backward()
    grads = [layer.A.weight.grad.clone(), layer.B.weight.grad.clone()]
    layer.zero_grad()

    y_ref = explicit_dlr(layer, x, index)
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], layer.A.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], layer.B.weight.grad, rtol=1e-12, atol=1e-12)


def test_scale_is_alpha_over_sqrt_k():
    layer, _ = make_layer(64, 176, 16, alpha=2.0)
    assert layer.dlr_scale == pytest.approx(2.0 / math.sqrt(11))


def test_fold_layer_is_exact_and_removes_the_buffer():
    layer, _ = make_layer(64, 176, 16)
    x = torch.randn(7, 64, dtype=torch.float64)
    before = layer(x)
    assert layer.fold_() is True
    assert "dlr_index" not in dict(layer.named_buffers())
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    assert layer.fold_() is False


# The training paths build B + sR three ways (eager autocast, eager fp32, torch.compile);
# the shipped layer (F.linear through `up_weight`) is the reference each must match bit for bit.
SHAPES = [(64, 176, 16), (176, 64, 16), (64, 64, 24), (16, 13, 4)]


def training_layer(layer: LowRankLinear) -> TrainingLowRankLinear:
    wrapper = torch.nn.Sequential(layer)
    assert apply_training_paths(wrapper) == 1 and type(wrapper[0]) is TrainingLowRankLinear
    return wrapper[0]


def reference_forward(layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    return LowRankLinear.forward(layer, x)


@pytest.mark.parametrize("mode", ["uniform", "random_reuse", "permuted"])
@pytest.mark.parametrize("d_in,d_out,rank", SHAPES)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compile-path"])
def test_training_paths_equal_linear_through_the_effective_weight(mode, d_in, d_out, rank, bf16, compiling, monkeypatch):
    layer, _ = make_layer(d_in, d_out, rank, mode, alpha=0.7)
    layer = training_layer(layer.float())
    x = torch.randn(3, 5, d_in, requires_grad=True)
    grad_out = torch.randn(3, 5, d_out)
    outs = []
    for forward in (layer, lambda t: reference_forward(layer, t)):
        # The branch dynamo traces, run eagerly: the same ops inductor then compiles.
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling and forward is layer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = forward(x)
        grads = torch.autograd.grad(y.float(), [x, layer.A.weight, layer.B.weight], grad_out)
        outs.append((y, *grads))
    assert outs[0][0].dtype == (torch.bfloat16 if bf16 else torch.float32)
    for got, want in zip(*outs):
        assert torch.equal(got, want)


def saved_bytes(layer: LowRankLinear, x: torch.Tensor, bf16: bool) -> int:
    """Bytes autograd keeps for backward that are not parameters, buffers, their cached
    views (built by a first call) or the input."""
    layer(x)
    cached = [t for t in (getattr(layer, "_dlr_cache", None) or ()) if t is not None]
    return saved_for_backward(lambda: layer(x), [*layer.parameters(), *layer.buffers(), *cached, x], bf16)


def saved_for_backward(run, keep: list[torch.Tensor], bf16: bool) -> int:
    """Bytes of the tensors autograd saves for backward while run() runs, less those in `keep`."""
    keep = {t.data_ptr() for t in keep}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in keep:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            run()
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_residual_keeps_no_more_for_backward_than_lowrank(bf16):
    # The memory target: DLR keeps exactly what a low-rank layer keeps. In fp32 the
    # effective weight is a new B-sized tensor; it is rebuilt in backward, not kept.
    dlr, _ = make_layer(64, 176, 16)
    lowrank = LowRankLinear(64, 176, 16, "silu")
    x = torch.randn(4, 8, 64)
    assert saved_bytes(training_layer(dlr.float()), x, bf16) == saved_bytes(lowrank, x, bf16) > 0


@pytest.mark.parametrize("assign", [False, True])
def test_cached_operands_follow_a_loaded_index(assign):
    uniform, _ = make_layer(32, 40, 8)
    uniform = training_layer(uniform)
    shuffled, index = make_layer(32, 40, 8, "random_reuse", seed=5)
    x = torch.randn(6, 32, dtype=torch.float64)
    uniform(x)  # fills the cache with the uniform layout
    uniform.load_state_dict(shuffled.state_dict(), assign=assign)
    torch.testing.assert_close(uniform(x), explicit_dlr(shuffled, x, index), rtol=1e-12, atol=1e-12)


def test_residual_layer_compiles_without_graph_breaks():
    layer, _ = make_layer(32, 40, 8)
    layer = training_layer(layer.float())

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x).float().sum()

    explained = torch._dynamo.explain(step)(torch.randn(2, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def parameter_forward(layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward when A and B were bare Parameters (F.linear on the tensors, no module call)."""
    z = torch.nn.functional.linear(x, layer.A.weight)
    z = z if layer.activation == "identity" else getattr(torch.nn.functional, layer.activation)(z)
    return torch.nn.functional.linear(z, layer.up_weight(), layer.bias)


@pytest.mark.parametrize("options", [{"method": "lowrank"}, {"method": "dlr"}, {"method": "dlr", "fold": True},
                                     {"method": "dlr", "bias": True, "trainable_latent_scale": True},
                                     {"method": "lowrank", "bias": True, "activation": "gelu"}])
def test_module_factors_give_the_parameter_forward_bitwise(options, monkeypatch):
    """Calling the factors as nn.Linear modules changes no logit bit of a whole model."""
    import dlr
    from dlr.artifacts.fold import fold_model

    options = dict(options)
    fold = options.pop("fold", False)
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", **options).eval()
    if fold:
        assert fold_model(model) > 0
    plain = [m.is_plain for m in model.modules() if isinstance(m, LowRankLinear)]
    assert plain and all(plain) == (fold or options["method"] == "lowrank")  # both forwards are exercised
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        monkeypatch.setattr(LowRankLinear, "forward", parameter_forward)
        want = model(input_ids=ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("options", [{}, {"trainable_alpha_divisor": 2.0, "bias": True}, {"latent_scale": 0.25},
                                     {"trainable_latent": True}])
def test_engine_forward_calls_b_and_computes_the_same_function(options):
    """With B replaced by an engine's layer (vLLM repacks its weight) the residual goes after B's call."""
    d_in, d_out, rank = 32, 80, 8
    layer = LowRankLinear(d_in, d_out, rank, "silu", 0.7, expand_index(d_out, rank, "random_reuse", 0, "q"), **options)
    torch.nn.init.normal_(layer.A.weight, std=0.3)
    torch.nn.init.normal_(layer.B.weight, std=0.3)
    layer = layer.double()
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    calls = []
    layer.B.register_forward_hook(lambda *_: calls.append(1))
    want = layer(x)
    assert not calls  # an nn.Linear B: the trained kernel, B + s R built from B's weight
    got = layer.engine_forward(layer.latent(x))
    assert calls and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [{"method": "dlr"}, {"method": "lowrank"},
                                     {"method": "dlr", "trainable_alpha": True, "bias": True, "expand": "random_reuse"},
                                     {"method": "dlr", "trainable_latent_scale": True}])
def test_training_paths_replace_the_layers_keeping_every_parameter_name_and_bit(options):
    """The training layers hold the shipped layers' very tensors under the same names, and the
    whole model's loss and gradients are the shipped model's bit for bit."""
    import dlr

    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", rank=8, **options)
    params, buffers, keys = dict(model.named_parameters()), dict(model.named_buffers()), list(model.state_dict())
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    want = model(input_ids=ids, labels=ids).loss
    want_grads = torch.autograd.grad(want, list(params.values()))

    assert apply_training_paths(model) == 7 * model.config.num_hidden_layers
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(type(m) is TrainingLowRankLinear for m in layers)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert all(b is buffers[n] for n, b in model.named_buffers())
    got = model(input_ids=ids, labels=ids).loss
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, list(params.values())), want_grads))
    assert apply_training_paths(model) == 0  # nothing shipped is left to replace
