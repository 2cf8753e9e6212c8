"""benchmarks/roofline.py reads every GEMM shape from the real model: its FLOPs are the MFU count."""
import pytest

from benchmarks import recipe, roofline
from dlr.model.counting import model_stats
from dlr.model.llama import build_model
from dlr.model.sizes import get_size


@pytest.mark.parametrize("method", ["full", "lowrank", "dlr"])
def test_the_bound_counts_the_flops_mfu_counts(method):
    micro_batch = 2
    bound = roofline.step_bound("llama_60m", method, micro_batch, "h200")
    stats = model_stats(build_model("llama_60m", method, device="meta"), recipe.SEQ)
    assert bound.flops == stats.train_flops_per_token * micro_batch * recipe.SEQ
    peak = roofline.GPUS["h200"][0]
    assert bound.seconds >= bound.flops / peak  # a lower bound can't beat the peak


def test_a_low_rank_projection_is_two_maps_through_its_rank():
    model = build_model("llama_tiny", "lowrank", device="meta")
    maps, cfg = roofline.linear_maps(model), model.config
    layers, d, r = cfg.num_hidden_layers, cfg.hidden_size, get_size("llama_tiny").default_rank
    assert len(maps) == 2 * 7 * layers + 1  # 7 factored projections per layer, and the lm_head
    assert maps.count((d, r)) == 6 * layers  # every A but down_proj's reads the hidden state
    assert maps[-1] == (d, cfg.vocab_size)


def test_generated_kernel_bytes_join_the_bound_at_full_bandwidth():
    size, gpu, moved = "llama_60m", "h200", 10e9
    text = roofline.table([size], gpu, {}, {(size, "full"): moved, (size, "lowrank"): moved})
    mb, bandwidth = recipe.recipe_micro_batch(size), roofline.GPUS[gpu][1]
    full, low = (roofline.step_bound(size, m, mb, gpu).seconds + moved / bandwidth for m in ("full", "lowrank"))
    assert f"| {full * 1e3:.1f} (" in text and f", {low * 1e3:.1f} (" in text and f", {low / full:.2f} |" in text
    assert "generated kernels" not in roofline.table([size], gpu, {})  # no traffic, no column
