"""What the trainer runs on a GPU: SDPA/flash attention, fused AdamW refusing a bad step on the
device, no host sync inside a step. The CUDA-only checks skip without a GPU (benchmarks/gpu_checks.sh runs them)."""
import pytest
import torch

from dlr import build_model
from dlr.optim import build_optimizer
from dlr.train.step import fused_adamw

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_forward_calls_sdpa_flash_eligible(monkeypatch):
    """No mask and is_causal=True: the only way SDPA may pick its flash kernel."""
    model = build_model("llama_tiny", method="dlr", rank=16)
    assert model.config._attn_implementation == "sdpa"
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask, is_causal, q.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(2, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == model.config.num_hidden_layers
    assert all(mask is None and causal for mask, causal, _ in calls), calls


def test_fused_adamw_refuses_a_non_finite_update_on_the_device():
    """found_inf = 1: weights, moments and the step count stay as they were (no host sync)."""
    torch.manual_seed(0)
    model = build_model("llama_tiny", method="dlr", rank=16)
    opt = build_optimizer({"name": "adamw", "weight_decay": 0.1}, model, "dlr", lr=1e-2, fused=True)
    assert fused_adamw(opt) is opt
    ids = torch.randint(2, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.found_inf = torch.zeros(())
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, opt.state.values()))
    assert all(int(s["step"]) == 1 for s in opt.state.values())


def test_cpu_keeps_the_foreach_adamw():
    model = build_model("llama_tiny", method="lowrank", rank=16)
    opt = build_optimizer({"name": "adamw"}, model, "lowrank", lr=1e-3)
    assert fused_adamw(opt) is None and not opt.defaults["fused"]


@cuda
def test_flash_attention_is_what_runs_on_cuda():
    """With every SDPA backend but flash disabled, a bf16 training step still runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model("llama_tiny", method="dlr", rank=16).cuda()
    ids = torch.randint(2, 1000, (4, 256), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


@cuda
def test_a_training_step_has_no_host_sync():
    """The hot path of dlr.train.loop under CUDA's sync debug mode: the compiled decoder (eager,
    transformers' mask code calls .all() once per forward), the compiled chunked loss, fused AdamW
    with found_inf."""
    from dlr.model.fused_loss import make_loss_fn
    from dlr.train.compile import compile_decoder
    from dlr.train.objective import TrainingObjective

    model = build_model("llama_tiny", method="dlr", rank=16).cuda()
    compile_decoder(model)
    objective = TrainingObjective(model, make_loss_fn("chunked", compiled=True))
    opt = build_optimizer({"name": "adamw"}, model, "dlr", lr=1e-3, fused=True)
    ids = torch.randint(2, 1000, (4, 256)).pin_memory().cuda(non_blocking=True)
    n = torch.tensor(4 * 255).pin_memory().cuda(non_blocking=True)
    for i in range(3):
        torch.cuda.set_sync_debug_mode("error" if i == 2 else "default")  # compilation and warm-up may sync
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = objective(input_ids=ids, labels=ids, num_items_in_batch=n).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@cuda
def test_the_compiled_loss_chunk_matches_the_plain_loss_on_cuda():
    """The compiled chunk (dlr/model/fused_loss.py, written out of place for inductor) through Triton: the
    plain loss's value and gradients in fp32, and the eager chunk's under bf16 autocast."""
    import torch.nn.functional as F

    from dlr.model.fused_loss import chunked_linear_cross_entropy, shift_labels

    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(3, 37, 64, device="cuda", generator=g) * 3).requires_grad_()
    w = torch.randn(1001, 64, device="cuda", generator=g).requires_grad_()
    y = torch.randint(0, 1001, (3, 37), device="cuda", generator=g)
    y[0, 4:11] = -100
    plain = F.cross_entropy(F.linear(h, w).float().reshape(-1, 1001), shift_labels(y).reshape(-1), ignore_index=-100)
    compiled = chunked_linear_cross_entropy(h, w, y, chunk_tokens=64, compiled=True)
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=0)
    for a, b in zip(torch.autograd.grad(compiled, (h, w)), torch.autograd.grad(plain, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = chunked_linear_cross_entropy(h, w, y, chunk_tokens=64)
        compiled = chunked_linear_cross_entropy(h, w, y, chunk_tokens=64, compiled=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for a, b in zip(torch.autograd.grad(compiled, (h, w)), torch.autograd.grad(eager, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)
