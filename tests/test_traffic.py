"""benchmarks/traffic.py: inductor's byte counts of the compiled step, extrapolated in depth and tokens."""
import dataclasses

from benchmarks import recipe, roofline, traffic
from dlr.model.llama import build_model
from dlr.model.sizes import get_size


def test_a_layers_gemm_bytes_are_the_rooflines_and_its_kernels_add_up():
    row = traffic.extrapolate("llama_tiny", "lowrank", micro_batch=3)
    one_layer = build_model(dataclasses.replace(get_size("llama_tiny"), num_hidden_layers=1), "lowrank", device="meta")
    maps = [m for m in roofline.linear_maps(one_layer) if m[1] != one_layer.config.vocab_size]
    # Forward, input gradient and weight gradient each read or write d_in + d_out bf16 values per token.
    assert row["layer_gemm_bytes_per_token"] == sum(6 * (d_in + d_out) for d_in, d_out in maps)
    # Norms, rotary, SiLU/SwiGLU, adds and casts: memory-bound work at least a few activations wide.
    assert row["layer_generated_bytes_per_token"] > 8 * one_layer.config.hidden_size
    kernels = row["layer_kernels_bytes_per_token"]
    assert sum(v for v, kind, _ in kernels if kind == "generated") == row["layer_generated_bytes_per_token"]
    assert any("sigmoid" in name for _, _, name in kernels)  # the SiLU of the latents and of SwiGLU
    assert row["generated_bytes"] > row["layers"] * row["micro_batch"] * recipe.SEQ * row["layer_generated_bytes_per_token"]
