"""scripts/roofline.py reads every GEMM shape from the real model: its FLOPs are the MFU count."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import roofline  # noqa: E402

from dlr.counting import model_stats  # noqa: E402
from dlr.model import build_model  # noqa: E402
from dlr.zoo import get_size  # noqa: E402


@pytest.mark.parametrize("method,fuse", [("full", False), ("lowrank", False), ("lowrank", True), ("dlr", True)])
def test_the_bound_counts_the_flops_mfu_counts(method, fuse):
    micro_batch = 2
    bound = roofline.step_bound("llama_60m", method, micro_batch, "h200", fuse_latents=fuse)
    stats = model_stats(build_model("llama_60m", method, device="meta"), roofline.SEQ)
    assert bound.flops == stats.train_flops_per_token * micro_batch * roofline.SEQ
    peak = roofline.GPUS["h200"][0]
    assert bound.seconds >= bound.flops / peak  # a lower bound can't beat the peak


def test_fusing_latents_merges_the_a_maps_of_each_group():
    model = build_model("llama_tiny", "lowrank", device="meta")
    plain, fused = roofline.linear_maps(model, False), roofline.linear_maps(model, True)
    layers, d, r = model.config.num_hidden_layers, model.config.hidden_size, get_size("llama_tiny").default_rank
    assert len(plain) - len(fused) == 3 * layers  # q/k/v: 3 A maps -> 1, gate/up: 2 -> 1
    assert fused.count((d, 3 * r)) == layers and fused.count((d, 2 * r)) == layers


def test_generated_kernel_bytes_join_the_bound_at_full_bandwidth():
    size, gpu, moved = "llama_60m", "h200", 10e9
    text = roofline.table([size], gpu, {}, {(size, "full"): moved, (size, "lowrank"): moved})
    mb, bandwidth = roofline.recipe_micro_batch(size), roofline.GPUS[gpu][1]
    full, low = (roofline.step_bound(size, m, mb, gpu).seconds + moved / bandwidth for m in ("full", "lowrank"))
    assert f"| {full * 1e3:.1f} (" in text and f", {low * 1e3:.1f} (" in text and f", {low / full:.2f} |" in text
    assert "generated kernels" not in roofline.table([size], gpu, {})  # no traffic, no column
