"""Causal-LM loss straight from the last hidden states: no [tokens, vocab] fp32 logits.

The plain path (`lm_head` then cross-entropy) materializes the logits, upcasts them to fp32
and keeps them (and their gradient) alive until backward: 128 x 256 x 32,000 x 4 bytes =
4 GiB per copy at llama_60m's recipe micro-batch, most of the step's peak memory. Here the
tokens are taken `chunk_tokens` at a time: logits of one chunk, their log-sum-exp, and, when a
gradient is needed, the chunk's gradients w.r.t. the hidden states and the lm_head weight,
computed right away (softmax - one-hot is the gradient of the summed cross-entropy). Backward
then only scales those by the incoming gradient. Peak extra memory: one chunk of logits.

Implementations (`loss=` in configs/train.yaml):
  chunked  this module (the default); the per-chunk math compiled with torch.compile when the model is
  liger    Liger-Kernel's fused linear cross-entropy (Triton, CUDA only; `pip install dlr[gpu]`);
           faster alone, but it syncs with the host once per micro-batch (see resolve_loss_impl)
  plain    transformers' own path (lm_head, fp32 logits, cross-entropy), for reference

All give the token-summed cross-entropy divided by `num_items` (the global number of label
tokens, as the trainer passes it) or, without it, by the local count: the same number HF's
ForCausalLMLoss computes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dlr.config.choices import LOSS_IMPLS

IGNORE_INDEX = -100
# Tokens per chunk: 8192 x 32,000 fp32 logits are 1 GiB, small next to the activations of
# the micro-batches that need a fused loss, large enough that the matmuls fill a GPU.
DEFAULT_CHUNK_TOKENS = 8192


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF's causal shift: position t is scored on labels[t + 1]; the last position on nothing."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _chunk_lse_and_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor):
    logits = (h @ w.t()).float()
    valid = y != IGNORE_INDEX
    safe = torch.where(valid, y, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
    return logits, valid, safe, lse, loss


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _chunk_lse_and_loss(h, w, y)[-1]


def _chunk_loss_and_grads(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed CE, d(scale * CE)/dh, d(scale * CE)/dw in fp32) of one chunk, eager."""
    logits, valid, safe, lse, loss = _chunk_lse_and_loss(h, w, y)
    # softmax - one-hot, in place on the logits buffer: one [chunk, vocab] fp32 tensor in all.
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, safe, torch.full_like(lse, -1.0).unsqueeze(1))
    grad = (grad * (valid.float() * scale).unsqueeze(1)).to(h.dtype)
    return loss, grad @ w, (grad.t() @ h).float()


def _chunk_loss_and_grads_fused(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same, written for torch.compile: out of place, the one-hot as an index comparison.

    Inductor then reads the GEMM's logits once for the log-sum-exp and once more for a single
    pointwise kernel that writes the gradient in h's dtype; no fp32 copy of the logits is
    stored. The in-place form above makes it write them in fp32, update them twice and
    scatter, three times the memory traffic (benchmarks/traffic.py counts it). Eager, this form would hold several fp32 [chunk, vocab]
    temporaries, so eager keeps the in-place one.
    """
    logits, valid, safe, lse, loss = _chunk_lse_and_loss(h, w, y)
    one_hot = torch.arange(logits.shape[1], device=logits.device) == safe
    grad = ((torch.exp(logits - lse.unsqueeze(1)) - one_hot.float()) * (valid.float() * scale).unsqueeze(1)).to(h.dtype)
    return loss, grad @ w, (grad.t() @ h).float()


_compiled: dict[str, Callable] = {}


def _kernels(compiled: bool) -> tuple[Callable, Callable]:
    if not compiled:
        return _chunk_loss, _chunk_loss_and_grads
    if not _compiled:
        # dynamic=False: a micro-batch gives at most two chunk shapes (full, last).
        _compiled["loss"] = torch.compile(_chunk_loss, dynamic=False)
        _compiled["grads"] = torch.compile(_chunk_loss_and_grads_fused, dynamic=False)
    return _compiled["loss"], _compiled["grads"]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, chunk: int,
                compiled: bool) -> torch.Tensor:
        _, loss_and_grads = _kernels(compiled)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            end = start + chunk
            loss, gh, gw = loss_and_grads(h[start:end], w, y[start:end], scale)
            total += loss
            grad_h[start:end] = gh
            grad_w += gw
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    # What autocast would run lm_head in: the trainer's bf16 autocast, else the tensors' dtype.
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 num_items: torch.Tensor | int | None = None, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                 compiled: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against shifted `labels`, one chunk of tokens at a time.

    hidden [B, T, H] (the final norm's output), weight [V, H] (lm_head), labels [B, T] unshifted,
    -100 ignored. reduction "mean": sum / num_items (or / the local label count); "sum": the sum.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; accepted: mean, sum")
    y = shift_labels(labels).reshape(-1)
    dtype = _compute_dtype(hidden.device.type, hidden.dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = h.to(dtype), weight.to(dtype)
        if reduction == "sum":
            scale = torch.ones((), device=h.device)
        elif num_items is None:
            scale = 1.0 / (y != IGNORE_INDEX).sum().clamp_min(1).float()
        else:
            scale = 1.0 / torch.as_tensor(num_items, device=h.device).float()
        if torch.compiler.is_compiling():
            # Inside a whole-model graph: plain differentiable math, which inductor fuses itself
            # (dynamo cannot capture the gradient buffers the autograd.Function fills in place).
            return _chunk_loss(h, w, y) * scale
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(h, w, y, scale, chunk_tokens, compiled)
        chunk_loss, _ = _kernels(compiled)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            total += chunk_loss(h[start:start + chunk_tokens], w, y[start:start + chunk_tokens])
        return total * scale


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               num_items: torch.Tensor | int | None = None, *, reduction: str = "mean") -> torch.Tensor:
    """The same loss through Liger-Kernel's fused linear cross-entropy (CUDA, Triton)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    y = shift_labels(labels).reshape(-1)
    dtype = _compute_dtype(hidden.device.type, hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype)
        total = liger_fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="sum")
    total = total.float()
    if reduction == "sum":
        return total
    if num_items is None:
        return total / (y != IGNORE_INDEX).sum().clamp_min(1)
    return total / torch.as_tensor(num_items, device=total.device)


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # not installed, or no Triton/CUDA build behind it
        return False
    return True


def resolve_loss_impl(impl: str, device: torch.device) -> str:
    """`impl`, once it is known to run on `device`.

    `chunked` is the default on every device: Liger's kernel alone can be faster
    (docs/performance.md), but its forward reads the label count back to the host
    (`target_mask.sum().item()`): one host sync per micro-batch, which the trainer's hot path
    must not have.
    """
    if impl not in LOSS_IMPLS:
        from ..errors import bad_value

        raise bad_value("loss", impl, LOSS_IMPLS)
    if impl == "liger" and (device.type != "cuda" or not liger_available()):
        from ..errors import ConfigError

        raise ConfigError(f"loss='liger' needs a CUDA device and liger-kernel (pip install 'dlr[gpu]'); "
                          f"device is {device.type}; accepted here: chunked, plain")
    return impl


def make_loss_fn(impl: str, *, compiled: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Callable | None:
    """The `fused_loss(hidden, weight, labels, num_items)` the model calls; None for `plain`."""
    if impl == "plain":
        return None
    if impl == "liger":
        return liger_linear_cross_entropy

    def chunked(hidden, weight, labels, num_items=None, reduction="mean"):
        return chunked_linear_cross_entropy(hidden, weight, labels, num_items, chunk_tokens=chunk_tokens,
                                            compiled=compiled, reduction=reduction)

    return chunked
