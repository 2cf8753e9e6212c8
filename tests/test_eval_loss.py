"""Token-averaged validation loss against a direct computation."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dlr.eval.loss import evaluate


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


def _dist_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        rows_x = torch.cat([b["input_ids"] for b in _batches()])
        rows_y = torch.cat([b["labels"] for b in _batches()])
        mine = [{"input_ids": rows_x[rank::world], "labels": rows_y[rank::world]}]
        res = evaluate(_model(), mine, "cpu")
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduced_across_processes(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_dist_worker, args=(world, f"file://{tmp_path}/init", str(tmp_path / "res")), nprocs=world)
    ref = evaluate(_model(), _batches(), "cpu")
    for r in range(world):
        res = torch.load(tmp_path / f"res.{r}", weights_only=True)
        assert res["val_tokens"] == ref["val_tokens"]
        assert math.isclose(res["val_loss"], ref["val_loss"], rel_tol=1e-6)
