"""The module the trainer runs: a causal LM's decoder and lm_head with the trainer's loss.

The shipped model (dlr.hf) computes its loss the Hugging Face way, from [tokens, vocab] logits.
The trainer computes it from the hidden states instead (dlr.model.fused_loss, `loss=` in
configs/train.yaml), and that choice is the trainer's: it lives here, not on the model class.

`TrainingObjective` holds the model's own `model` (the decoder) and `lm_head` modules under
those same names, so its parameters are the model's very objects with the model's names: the
optimizer, the training checkpoints and the fold see one model, and a model directory is
written from the model itself. It is what DDP wraps and what FSDP2 makes its root unit, whose
forward gathers lm_head with the final norm before the loss reads lm_head's weight.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast


class TrainingObjective(nn.Module):
    """forward(input_ids, labels, num_items_in_batch) -> output with `.loss`: the summed token
    cross-entropy divided by `num_items_in_batch` (or by the local label count)."""

    def __init__(self, causal_lm: nn.Module, loss_fn: Callable | None) -> None:
        """`loss_fn(hidden, lm_head_weight, labels, num_items)`, or None for the model's own loss
        (lm_head, fp32 logits, cross-entropy: `loss=plain`)."""
        super().__init__()
        self.model, self.lm_head, self.loss_fn = causal_lm.model, causal_lm.lm_head, loss_fn
        # Kept outside the module tree: its modules are already children here, under its names.
        self._causal_lm = (causal_lm,)
        mine, theirs = dict(self.named_parameters()), dict(causal_lm.named_parameters())
        if mine.keys() != theirs.keys() or any(mine[k] is not theirs[k] for k in mine):
            raise ValueError(f"{type(causal_lm).__name__} holds parameters outside its model and lm_head; "
                             "the training objective would not train them")

    @property
    def causal_lm(self) -> nn.Module:
        """The model being trained (what is evaluated, folded and saved)."""
        return self._causal_lm[0]

    def train(self, mode: bool = True) -> TrainingObjective:
        # The causal LM's own flag too, so that code given the model (evaluation) restores the mode
        # this module is in.
        self.causal_lm.train(mode)
        return super().train(mode)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                num_items_in_batch: torch.Tensor | int | None = None) -> CausalLMOutputWithPast:
        if self.loss_fn is None:
            return self.causal_lm(input_ids=input_ids, labels=labels, num_items_in_batch=num_items_in_batch)
        hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return CausalLMOutputWithPast(loss=self.loss_fn(hidden, self.lm_head.weight, labels, num_items_in_batch))
