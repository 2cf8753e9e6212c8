"""Token-averaged validation loss against a direct computation."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dlr.evaluation import evaluate


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for B, lens in ((3, [12, 5, 2]), (2, [12, 9])):
        x = torch.randint(3, 32000, (B, 12), generator=g)
        y = x.clone()
        for i, n in enumerate(lens):
            x[i, n:] = 0
            y[i, n:] = -100
        out.append({"input_ids": x, "labels": y})
    return out


def test_matches_direct_token_average():
    model, batches = _model(), _batches()
    model.train()
    res = evaluate(model, batches, "cpu")
    assert model.training  # mode restored
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            for row_x, row_y in zip(b["input_ids"], b["labels"]):
                n = int((row_y != -100).sum())
                logits = model(input_ids=row_x[None, :n]).logits[0].float()  # unpadded, one row
                total += F.cross_entropy(logits[:-1], row_y[1:n], reduction="sum").item()
                count += n - 1
    assert res["val_tokens"] == count == 11 + 4 + 1 + 11 + 8
    assert math.isclose(res["val_loss"], total / count, rel_tol=1e-5)
    assert math.isclose(res["val_ppl"], math.exp(total / count), rel_tol=1e-5)
    # Not the per-batch mean: batches hold different numbers of tokens.
    per_batch = [evaluate(model, [b], "cpu")["val_loss"] for b in batches]
    assert not math.isclose(res["val_loss"], sum(per_batch) / len(per_batch), rel_tol=1e-6)


def test_autocast_dtype_runs():
    model = _model()
    model.eval()
    res = evaluate(model, _batches(), "cpu", dtype=torch.bfloat16)
    ref = evaluate(model, _batches(), "cpu")
    assert not model.training  # eval mode restored as eval
    assert res["val_tokens"] == ref["val_tokens"] and abs(res["val_loss"] - ref["val_loss"]) < 0.05
