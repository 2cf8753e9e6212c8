"""Building the zoo: layout, init, SDPA, bad input, counts, and the whole-model fold."""
import pytest
import torch

import dlr
from dlr.hf.lowrank import PROJECTIONS, cola_init_std


def test_every_projection_is_factorized_and_the_rest_stays_dense():
    model = dlr.build_model("llama_tiny", method="dlr")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for proj in PROJECTIONS:
                if hasattr(parent, proj):
                    assert isinstance(getattr(parent, proj), dlr.LowRankLinear)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    assert model.config._attn_implementation == "sdpa"


def test_ids_match_the_t5_tokenizer():
    c = dlr.build_model("llama_tiny", method="full").config
    assert (c.vocab_size, c.pad_token_id, c.eos_token_id, c.bos_token_id) == (32000, 0, 1, None)
    assert c.rms_norm_eps == 1e-6 and c.hidden_act == "silu" and c.tie_word_embeddings is False


@pytest.mark.parametrize("size,dims", [
    ("llama_60m", (512, 1376, 8, 8, 128)), ("llama_130m", (768, 2048, 12, 12, 256)),
    ("llama_350m", (1024, 2736, 16, 24, 256)), ("llama_1b", (2048, 5461, 32, 24, 512)),
    ("llama_7b", (4096, 11008, 32, 32, 1024)),
])
def test_zoo_dimensions_and_default_rank(size, dims):
    s = dlr.get_size(size)
    assert (s.hidden_size, s.intermediate_size, s.num_attention_heads, s.num_hidden_layers, s.default_rank) == dims
    assert dlr.make_config(size, dlr.factorization("lowrank")).dlr_rank == dims[-1]


def test_cola_init_is_not_overwritten_by_hf_init():
    torch.manual_seed(0)
    model = dlr.build_model("llama_demo", method="lowrank")
    up = model.model.layers[0].mlp.up_proj
    expected = cola_init_std(up.in_features, up.out_features, up.rank)
    for w in (up.A.weight, up.B.weight):
        assert w.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(expected - 0.02) > 0.02  # HF's default would be distinguishable


def test_7b_on_meta_allocates_nothing():
    model = dlr.build_model("llama_7b", method="dlr", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert dlr.model_stats(model).total_params > 2_000_000_000


@pytest.mark.parametrize("kwargs,needle", [
    (dict(model="llama_9000"), "model='llama_9000'"),
    (dict(model="llama_tiny", method="sparse"), "method='sparse'"),
    (dict(model="llama_tiny", rank=0), "rank=0"),
    (dict(model="llama_tiny", rank=-3), "rank=-3"),
    (dict(model="llama_tiny", rank=64), "rank=64"),
    (dict(model="llama_tiny", rank=2.5), "rank=2.5"),
    (dict(model="llama_tiny", alpha=-1.0), "alpha=-1.0"),
    (dict(model="llama_tiny", alpha=float("nan")), "alpha=nan"),
    (dict(model="llama_tiny", alpha=float("inf")), "alpha=inf"),
    (dict(model="llama_tiny", expand="shuffle"), "expand='shuffle'"),
    (dict(model="llama_tiny", scope="ffn"), "scope='ffn'"),
    (dict(model="llama_tiny", activation="tanh"), "activation='tanh'"),
])
def test_bad_input_is_one_line_naming_value_and_accepted(kwargs, needle):
    with pytest.raises(dlr.ConfigError) as err:
        dlr.build_model(**kwargs)
    msg = str(err.value)
    assert needle in msg and "accepted" in msg and "\n" not in msg


def _closed_form(size: str, method: str, seq_len: int = 256):
    s = dlr.get_size(size)
    h, i, L, r, V = s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.default_rank, 32000
    proj = 4 * h * h + 3 * h * i if method == "full" else 8 * r * h + 3 * r * (h + i)
    non_emb = L * (proj + 2 * h) + h
    fwd = 2 * (L * proj + V * h) + 4 * L * seq_len * h
    return non_emb + 2 * V * h, non_emb, fwd


@pytest.mark.parametrize("size", ["llama_tiny", "llama_demo", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b"])
@pytest.mark.parametrize("method", ["full", "lowrank", "dlr"])
def test_counts_match_closed_form(size, method):
    stats = dlr.model_stats(dlr.build_model(size, method=method, device="meta"))
    total, non_emb, fwd = _closed_form(size, method)
    assert (stats.total_params, stats.non_embedding_params, stats.forward_flops_per_token) == (total, non_emb, fwd)
    assert stats.train_flops_per_token == 3 * fwd


def test_docs_table_is_current():
    from dlr.model.counting import zoo_table

    with open("docs/models.md") as f:
        assert zoo_table() in f.read(), "docs/models.md is stale: run `python scripts/model_table.py`"


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32000, (2, 32), generator=g)


@pytest.mark.parametrize("options", [dict(), dict(expand="random_reuse", seed=5), dict(scope="attn"), dict(scope="mlp"), dict(activation="identity", alpha=2.0)])
def test_fold_whole_model_is_exact_and_loads_into_lowrank(options):
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method="dlr", **options).eval()
    # Train-like weights: the fold must hold for any B, not just the init.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = _batch()
    with torch.no_grad():
        before = model(input_ids=x).logits
    n = dlr.fold_model(model)
    expected_layers = {"all": 14, "attn": 8, "mlp": 6}[options.get("scope", "all")]
    assert n == expected_layers and model.config.dlr_folded is True
    with torch.no_grad():
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    assert dlr.fold_model(model) == 0  # folding twice is a no-op
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, after)

    lowrank = dlr.build_model("llama_tiny", method="lowrank", activation=options.get("activation", "silu"))
    sd, ref = model.state_dict(), lowrank.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    lowrank.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(lowrank.eval()(input_ids=x).logits, after)


def test_folded_model_has_lowrank_params_and_flops():
    model = dlr.build_model("llama_60m", method="dlr", device="meta")
    dlr.fold_model(model)
    assert dlr.model_stats(model) == dlr.model_stats(dlr.build_model("llama_60m", method="lowrank", device="meta"))
