"""Spectron under DDP: two gloo processes with different data stay bit-identical."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dlr.optim import build_optimizer

CFG = {"name": "spectron", "lr": 0.02, "weight_decay": 0.01}


class Factored(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.A = nn.utils.skip_init(nn.Linear, d_in, rank, bias=False)
        self.B = nn.utils.skip_init(nn.Linear, rank, d_out, bias=False)
        with torch.no_grad():
            self.A.weight.copy_(torch.randn(rank, d_in) / d_in**0.5)
            self.B.weight.copy_(torch.randn(d_out, rank) / rank**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(16), Factored(16, 32, 4), nn.ReLU(), Factored(32, 16, 4), nn.Linear(16, 1))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = build_optimizer(CFG, model, "lowrank")  # built on the wrapper: names are prefixed
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(5):
            x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        torch.save(
            {"params": model.module.state_dict(), "opt": opt.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
    # Leave without running destructors: freeing the DDP reducer joins gloo's worker thread
    # while holding the GIL that thread may need for a last decref, which can deadlock the
    # worker at exit (seen here under load). The results are already on disk.
    os._exit(0)


def test_ddp_ranks_stay_identical():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    assert r0["params"].keys() == r1["params"].keys()
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key]), key
    # The optimizer moved the weights, and the power-iteration state agrees too.
    assert not torch.equal(r0["params"]["1.A.weight"], make_model().state_dict()["1.A.weight"])
    for index, state in r0["opt"]["state"].items():
        for key, value in state.items():
            other = r1["opt"]["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
