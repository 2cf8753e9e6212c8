"""fuse_latents: q/k/v and gate/up latents from one GEMM each give the unfused model's numbers."""
import copy
import gc
import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dlr
from dlr.errors import ConfigError
from dlr.fold import fold_model
from dlr.hf.lowrank import LatentGroup, LowRankLinear
from dlr.model import set_fuse_latents

IDS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


def pair(method: str, **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(unfused, fused) with the same weights."""
    torch.manual_seed(0)
    plain = dlr.build_model("llama_tiny", method, **options)
    fused = copy.deepcopy(plain)
    assert set_fuse_latents(fused, True) == 2 * plain.config.num_hidden_layers
    return plain, fused


def loss_and_grads(model, ids=IDS, bf16=False) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def groups(model) -> list[LatentGroup]:
    return list({id(m._latent_group): m._latent_group for m in model.modules()
                 if isinstance(m, LowRankLinear) and m._latent_group is not None}.values())


def assert_nothing_cached(model) -> None:
    for g in groups(model):
        assert g.source is None and all(p is None for p in g.pending) and not g.active


def assert_same(a: tuple, b: tuple, rtol: float, atol: float) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


# The latent act(A x) does not depend on the other knobs (they act on the up weight and the
# output), so siblings with them are grouped too.
KNOBS = dict(activation="gelu", trainable_alpha=True, trainable_latent_scale=True, bias=True, expand="random_reuse")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method,options", [("lowrank", {}), ("dlr", {}), ("dlr", KNOBS)],
                         ids=["lowrank", "dlr", "dlr-knobs"])
def test_fused_gives_the_unfused_loss_and_gradients(method, options, bf16):
    plain, fused = pair(method, **options)
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    assert_same(loss_and_grads(fused, bf16=bf16), loss_and_grads(plain, bf16=bf16), **tol)
    assert_nothing_cached(fused)


def test_fusion_runs_fewer_gemms_and_keeps_nothing_past_the_layer():
    plain, fused = pair("dlr")
    counts = []
    for model in (plain, fused):
        with CountMatmuls() as mode:
            loss_and_grads(model)
        counts.append(mode.count)
    # Per layer: forward 3 fewer latent GEMMs (q/k/v -> 1, gate/up -> 1), backward 6 fewer (dX, dA).
    assert counts[0] - counts[1] == 9 * plain.config.num_hidden_layers

    seen = []

    def after_layer(layer, args, output):
        seen.append([(g.source, list(g.pending)) for g in groups(layer)])

    for layer in fused.model.layers:
        layer.register_forward_hook(after_layer)
    fused(input_ids=IDS)
    assert len(seen) == 2 and all(len(state) == 2 for state in seen)  # 2 layers, 2 groups each
    assert all(s is None and not any(p is not None for p in pend) for state in seen for s, pend in state)


def test_no_latent_outlives_its_step(monkeypatch):
    _, fused = pair("dlr")
    refs = []
    latent = LatentGroup.latent

    def recording(self, slot, x):
        z = latent(self, slot, x)
        refs.append(weakref.ref(z))
        return z

    monkeypatch.setattr(LatentGroup, "latent", recording)
    loss = fused(input_ids=IDS, labels=IDS).loss
    assert len(refs) == 10 and all(r() is not None for r in refs)  # kept by autograd for backward
    loss.backward()
    del loss
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_sibling_called_alone_or_with_another_input_is_unfused():
    plain, fused = pair("dlr")
    attn, ref = fused.model.layers[0].self_attn, plain.model.layers[0].self_attn
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    torch.testing.assert_close(attn.k_proj(x), ref.k_proj(x), rtol=0, atol=0)  # outside the parent's forward
    assert_nothing_cached(fused)
    group = attn.q_proj._latent_group
    group._open(attn, ())  # inside the parent's forward, as its pre-hook does
    for name, inp in (("q_proj", x), ("k_proj", other), ("v_proj", other), ("q_proj", x)):
        torch.testing.assert_close(getattr(attn, name)(inp), getattr(ref, name)(inp), rtol=1e-6, atol=1e-6)
    group._close(attn, (), None)
    assert_nothing_cached(fused)


def test_layout_is_unchanged_and_fusion_can_be_turned_off():
    plain, fused = pair("dlr")
    assert [(n, p.shape) for n, p in fused.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert set_fuse_latents(fused, False) == 0
    assert not groups(fused) and not any(m._forward_hooks or m._forward_pre_hooks for m in fused.modules())
    assert set_fuse_latents(dlr.build_model("llama_tiny", "full"), True) == 0
    with pytest.raises(ConfigError, match="fuse_latents='yes'"):
        dlr.build_model("llama_tiny", "dlr", fuse_latents="yes")


def test_the_fold_after_fused_training_equals_the_unfused_one():
    plain, fused = pair("dlr")
    for model in (plain, fused):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(2):
            loss_and_grads(model, IDS + step)
            opt.step()
        fold_model(model)
    a, b = plain.state_dict(), fused.state_dict()
    assert a.keys() == b.keys() and not any("dlr_index" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # The folded model still runs fused (plain lowrank layers) and gives the same logits.
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_the_fused_latents():
    plain, fused = pair("dlr")
    reference = loss_and_grads(plain)
    counts = []
    for model in (plain, fused):  # as dlr.train.loop enables it
        model.train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        with CountMatmuls() as mode:
            result = loss_and_grads(model)
        counts.append(mode.count)
    assert_same(result, reference, rtol=1e-5, atol=1e-6)
    assert_nothing_cached(fused)
    # The recompute is fused too: 3 fewer GEMMs per layer in forward and in recompute, 6 in backward.
    assert counts[0] - counts[1] == 12 * plain.config.num_hidden_layers


def test_the_compiled_decoder_is_one_fused_graph_with_the_same_numbers():
    plain, fused = pair("dlr", trainable_alpha=True, bias=True)  # the knobs leave the latent alone

    def hidden(model):
        return lambda ids: model.model(input_ids=ids, use_cache=False).last_hidden_state.sum()

    graphs = []
    for model in (plain, fused):
        explained = torch._dynamo.explain(hidden(model))(IDS)
        torch._dynamo.reset()
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        graphs.append(explained.graphs[0].code.count("linear("))
    assert graphs[0] - graphs[1] == 3 * plain.config.num_hidden_layers
    # The trainer's compile (model.model.compile()) through AOTAutograd, forward and backward.
    reference = loss_and_grads(plain)
    fused.model.compile(backend="aot_eager")
    try:
        assert_same(loss_and_grads(fused), reference, rtol=1e-5, atol=1e-6)
        assert_nothing_cached(fused)
    finally:
        torch._dynamo.reset()


def saved_bytes(model, bf16: bool) -> int:
    """Bytes autograd keeps for backward that are not parameters or buffers."""
    from test_layers import saved_for_backward

    return saved_for_backward(lambda: model(input_ids=IDS, labels=IDS), [*model.parameters(), *model.buffers()], bf16)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_fusion_keeps_for_backward_what_unfused_keeps_but_one_copy(bf16):
    plain, fused = pair("dlr")
    if bf16:
        # Autocast's bf16 copy of x is made (and kept) once per group, not once per projection;
        # the bf16 cast of cat(A_i) has the bytes of the per-projection casts it replaces.
        tokens_x_hidden = IDS.numel() * plain.config.hidden_size
        expected = -sum((len(g.members) - 1) * tokens_x_hidden * 2 for g in groups(fused))
    else:
        # In fp32, F.linear keeps its weight: the concatenated copy of the grouped A's.
        expected = sum(m.A.numel() * m.A.element_size() for g in groups(fused) for m in g.members)
    assert saved_bytes(fused, bf16) - saved_bytes(plain, bf16) == expected
