"""Validation loss/perplexity averaged over tokens (not over batches).

Every label token weighs the same, whatever the batch or process it falls in: the loss is
sum(token CE) / number of label tokens, both summed across processes. GaLore's and CoLA's evaluation code's per-batch
mean (divided by N+1) over-weights short batches; we deliberately do not reproduce it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from ..model.fused_loss import chunked_linear_cross_entropy


def _fsdp_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


def _summed_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, compiled_loss: bool) -> torch.Tensor:
    """Summed token CE; from the hidden states in chunks when the model is a decoder + lm_head
    (every model dlr writes), so no fp32 [batch, seq, vocab] logits are built."""
    if _fsdp_sharded(model):
        # FSDP2 gathers the root's parameters (final norm, lm_head) in the root's forward only, so
        # go through it; the model's loss divided by num_items_in_batch=1 is the summed CE.
        return model(input_ids=x, labels=y, num_items_in_batch=torch.ones((), device=x.device)).loss
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=x, use_cache=False).last_hidden_state
        return chunked_linear_cross_entropy(hidden, head.weight, y, reduction="sum", compiled=compiled_loss)
    logits = model(input_ids=x).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def evaluate(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str,
             dtype: torch.dtype | None = None, progress: bool = False, compiled_loss: bool = False) -> dict[str, float | int]:
    """{"val_loss", "val_ppl", "val_tokens"} of a causal LM over `batches` (labels -100 = ignored).

    No attention mask is passed: padding is on the right and masked in the labels, so causal
    attention never lets a real token see a pad, and SDPA keeps its fast path.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # float64 accumulators: 10M token losses summed in fp32 would lose digits.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="eval", leave=False)
    try:
        with torch.no_grad():
            for b in it:
                x = b["input_ids"].to(device, non_blocking=True)
                y = b["labels"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss_sum += _summed_loss(model, x, y, compiled_loss).double()
                count += (y[:, 1:] != -100).sum()
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(count)
    n = int(count.item())
    loss = float(loss_sum.item()) / n if n else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(loss) if n and loss < 700 else float("inf") if n else float("nan"),
            "val_tokens": n}
