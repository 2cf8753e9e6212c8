"""The fused / chunked LM loss against transformers' own loss: values, gradients, reductions."""
import pytest
import torch
import torch.nn.functional as F

from dlr import build_model
from dlr.errors import ConfigError
from dlr.eval.loss import evaluate
from dlr.model.fused_loss import chunked_linear_cross_entropy, make_loss_fn, resolve_loss_impl, shift_labels
from dlr.train.objective import TrainingObjective


def _inputs(seed=0, B=3, T=37, H=24, V=101):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, H, generator=g) * 3).requires_grad_()
    w = torch.randn(V, H, generator=g).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 4:11] = -100
    y[2, -5:] = -100
    return h, w, y


def _plain(h, w, y, num_items=None):
    logits = F.linear(h, w).float().reshape(-1, w.shape[0])
    target = shift_labels(y).reshape(-1)
    total = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    return total / (num_items if num_items is not None else (target != -100).sum())


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("num_items", [None, 200])
def test_chunked_equals_plain_in_fp32(chunk, num_items):
    h, w, y = _inputs()
    ref = _plain(h, w, y, num_items)
    out = chunked_linear_cross_entropy(h, w, y, num_items, chunk_tokens=chunk)
    assert abs(out.item() - ref.item()) / ref.item() < 1e-5
    for a, b in zip(_grads(out, h, w), _grads(ref, h, w)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_gradient_scales_with_the_upstream_gradient():
    h, w, y = _inputs(1)
    ga = _grads(chunked_linear_cross_entropy(h, w, y, chunk_tokens=16) * 3.5, h, w)
    gb = _grads(_plain(h, w, y) * 3.5, h, w)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_sum_matches_and_all_ignored_gives_zero():
    h, w, y = _inputs(2)
    with torch.no_grad():
        total = chunked_linear_cross_entropy(h, w, y, reduction="sum", chunk_tokens=5)
        ref = _plain(h, w, y, num_items=1)
        assert total.item() == pytest.approx(ref.item(), rel=1e-6)
        none = chunked_linear_cross_entropy(h, w, torch.full_like(y, -100))
        assert none.item() == 0.0


def test_bf16_autocast_runs_the_matmul_in_bf16_and_stays_close():
    h, w, y = _inputs(3, H=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_linear_cross_entropy(h, w, y)
        ref = F.cross_entropy(F.linear(h, w).float().reshape(-1, w.shape[0]), shift_labels(y).reshape(-1))
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) / ref.item() < 1e-2
    gh, gw = _grads(out, h, w)
    assert gh.dtype == h.dtype and gw.dtype == w.dtype and torch.isfinite(gw).all()


def test_model_loss_through_the_fused_path_equals_hf_loss():
    torch.manual_seed(0)
    model = build_model("llama_tiny", method="dlr", rank=16)
    ids = torch.randint(2, 1000, (2, 33))
    labels = ids.clone()
    labels[1, 20:] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref_grads = _grads(ref, model.lm_head.weight, model.model.layers[0].self_attn.q_proj.B.weight)
    out = TrainingObjective(model, make_loss_fn("chunked"))(input_ids=ids, labels=labels)
    assert out.logits is None  # no [tokens, vocab] tensor was built
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(_grads(out.loss, model.lm_head.weight, model.model.layers[0].self_attn.q_proj.B.weight), ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # The plain objective is the model's own loss, bit for bit; the model itself keeps HF's.
    plain = TrainingObjective(model, make_loss_fn("plain"))(input_ids=ids, labels=labels).loss
    assert torch.equal(plain, ref)
    assert model(input_ids=ids, labels=labels).logits.shape == (2, 33, model.config.vocab_size)


def test_evaluation_from_hidden_states_equals_the_logits_path():
    torch.manual_seed(0)
    model = build_model("llama_tiny", method="lowrank", rank=16)
    ids = torch.randint(2, 1000, (4, 40))
    labels = ids.clone()
    labels[0, 30:] = -100
    batches = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    result = evaluate(model, batches, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert result["val_tokens"] == int((labels[:, 1:] != -100).sum())
    assert result["val_loss"] == pytest.approx(ref.item(), rel=1e-6)


def test_loss_choice_is_checked():
    cpu = torch.device("cpu")
    assert resolve_loss_impl("chunked", cpu) == "chunked"
    with pytest.raises(ConfigError, match="loss='auto'.*accepted: chunked, liger, plain"):
        resolve_loss_impl("auto", cpu)
    assert resolve_loss_impl("plain", cpu) == "plain" and make_loss_fn("plain") is None
    with pytest.raises(ConfigError, match="loss='fused'.*accepted"):
        resolve_loss_impl("fused", cpu)
    with pytest.raises(ConfigError, match="loss='liger' needs a CUDA device"):
        resolve_loss_impl("liger", cpu)


def test_the_compiled_chunk_equals_the_eager_chunk_and_the_plain_loss():
    """The compiled path runs another formulation of the chunk (out of place, for inductor)."""
    h, w, y = _inputs(4)
    ref = _plain(h, w, y)
    out = chunked_linear_cross_entropy(h, w, y, chunk_tokens=64, compiled=True)
    assert abs(out.item() - ref.item()) / ref.item() < 1e-5
    for a, b in zip(_grads(out, h, w), _grads(ref, h, w)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = chunked_linear_cross_entropy(h, w, y, chunk_tokens=64)
        compiled = chunked_linear_cross_entropy(h, w, y, chunk_tokens=64, compiled=True)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)
    for a, b in zip(_grads(compiled, h, w), _grads(eager, h, w)):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-4)


def test_the_compiled_chunk_holds_one_logits_buffer_in_the_compute_dtype():
    """What the memory estimate counts for a compiled fused loss (dlr/train/plan.py: 2 bytes a
    logit in bf16): the gradient overwrites the matmul's output, no fp32 copy is stored."""
    from torch._inductor.utils import run_and_get_code

    from dlr.model.fused_loss import _chunk_loss_and_grads_fused

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(96, 16, generator=g).bfloat16(), torch.randn(500, 16, generator=g).bfloat16()
    y = torch.randint(0, 500, (96,), generator=g)
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(_chunk_loss_and_grads_fused, dynamic=False), h, w, y, torch.tensor(0.1))
    logits_buffers = [line for line in code[-1].splitlines() if "empty_strided" in line and "(96, 500)" in line]
    assert len(logits_buffers) == 1 and "torch.bfloat16" in logits_buffers[0], logits_buffers


def test_the_training_objective_trains_the_models_own_parameters_under_their_names():
    model = build_model("llama_tiny", method="dlr", rank=16)
    objective = TrainingObjective(model, make_loss_fn("chunked"))
    assert objective.causal_lm is model
    assert list(objective.state_dict()) == list(model.state_dict())
    assert [n for n, _ in objective.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(objective.parameters(), model.parameters()))
    objective.eval()  # the model's own flag follows, so code handed the model restores this mode
    assert not model.training and not model.model.layers[0].training
    objective.train()
    assert model.training and model.lm_head.training
    model.extra = torch.nn.Linear(2, 2)  # a parameter outside the decoder and lm_head would go untrained
    with pytest.raises(ValueError, match="outside its model and lm_head"):
        TrainingObjective(model, None)
