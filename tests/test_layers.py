"""The DLR residual through B + sR equals the paper's explicit repeat_interleave form."""
import math

import pytest
import torch

from dlr.hf.lowrank import LowRankLinear, cola_init_std, expand_index, expansion_factor


def explicit_dlr(layer: LowRankLinear, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y = B z + (alpha/sqrt K) Expand_K(z), the expansion materialised per token."""
    z = torch.nn.functional.silu(x @ layer.A.T)
    return z @ layer.B.T + layer.dlr_scale * z[..., index]


def make_layer(d_in, d_out, rank, mode="uniform", alpha=1.0, seed=0):
    index = expand_index(d_out, rank, mode, seed, "0.q_proj")
    scale = alpha / math.sqrt(expansion_factor(d_out, rank))
    layer = LowRankLinear(d_in, d_out, rank, "silu", scale, index)
    torch.nn.init.normal_(layer.A, std=cola_init_std(d_in, d_out, rank))
    torch.nn.init.normal_(layer.B, std=cola_init_std(d_in, d_out, rank))
    return layer.double(), index


def test_uniform_index_is_contiguous_duplication_truncated():
    # d_out=10, r=4 -> K=3: outputs 0-2 read latent 0, 3-5 latent 1, 6-8 latent 2, 9 latent 3.
    assert expand_index(10, 4, "uniform", 0, "x").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    z = torch.arange(4.0)
    assert torch.equal(z.repeat_interleave(3)[:10], z[expand_index(10, 4, "uniform", 0, "x")])


def test_random_reuse_index_is_seeded_and_balanced():
    a = expand_index(176, 16, "random_reuse", 3, "1.up_proj")
    assert torch.equal(a, expand_index(176, 16, "random_reuse", 3, "1.up_proj"))
    assert not torch.equal(a, expand_index(176, 16, "random_reuse", 4, "1.up_proj"))
    assert not torch.equal(a, expand_index(176, 16, "uniform", 3, "1.up_proj"))
    assert torch.equal(torch.bincount(a, minlength=16), torch.bincount(expand_index(176, 16, "uniform", 0, "x"), minlength=16))


@pytest.mark.parametrize("mode", ["uniform", "random_reuse"])
@pytest.mark.parametrize("d_in,d_out,rank", [(64, 176, 16), (176, 64, 16), (64, 64, 24)])
def test_effective_weight_matches_explicit_expansion(mode, d_in, d_out, rank):
    layer, index = make_layer(d_in, d_out, rank, mode, alpha=0.7)
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    grad_out = torch.randn(3, 5, d_out, dtype=torch.float64)

    y = layer(x)
    (y * grad_out).sum().backward()
    grads = [layer.A.grad.clone(), layer.B.grad.clone()]
    layer.zero_grad()

    y_ref = explicit_dlr(layer, x, index)
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], layer.A.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], layer.B.grad, rtol=1e-12, atol=1e-12)


def test_scale_is_alpha_over_sqrt_k():
    layer, _ = make_layer(64, 176, 16, alpha=2.0)
    assert layer.dlr_scale == pytest.approx(2.0 / math.sqrt(11))


def test_fold_layer_is_exact_and_removes_the_buffer():
    layer, _ = make_layer(64, 176, 16)
    x = torch.randn(7, 64, dtype=torch.float64)
    before = layer(x)
    assert layer.fold_() is True
    assert "dlr_index" not in dict(layer.named_buffers())
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    assert layer.fold_() is False
