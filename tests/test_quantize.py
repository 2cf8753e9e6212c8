"""dlr-quantize end to end: a tiny DLR model trained on the bundled C4 sample, folded by the trainer,
quantized (w8a8 and w4a16), loaded back by dlr-eval's loader and by transformers."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dlr.cli.evaluate import main as eval_cli
from dlr.cli.quantize import main as quantize_cli
from dlr.config import QUANT_SCHEMES
from dlr.hf.lowrank import PROJECTIONS, LowRankLinear
from dlr.artifacts.model_dir import load_model_dir
from dlr.artifacts.quantize import SCHEMES, factor_count, unquantized_linears

TINY = ["model=llama_tiny", "data=c4_sample", "global_batch=4", "micro_batch=4", "log_every=5", "data.val_tokens=2000",
        "data.num_workers=0", "eval_every=30", "save_every=30", "steps=30", "method=dlr"]
CHECK = ["eval_tokens=4000", "batch_size=8"]
LAYERS, FACTORS = 2 * len(PROJECTIONS), 2 * 2 * len(PROJECTIONS)  # llama_tiny: 2 layers, 7 projections, A and B
# Stated bounds on the trained tiny model (docs/checkpoints.md has the measured values).
W8A8_PPL_RATIO, W8A8_AGREEMENT = 1.01, 0.97
W4A16_PPL_RATIO, W4A16_AGREEMENT = 1.10, 0.80


def call(cli, args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A trained DLR run (final/ and the folded/ the trainer writes)."""
    from dlr.config import from_overrides
    from dlr.train.loop import train

    out = tmp_path_factory.mktemp("quant") / "run"
    train(from_overrides("train", [*TINY, f"out_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def w8a8(run) -> Path:
    with pytest.raises(SystemExit) as e:
        quantize_cli([f"ckpt={run / 'folded'}", *CHECK])
    assert e.value.code == 0
    return run / "folded-w8a8"


@pytest.fixture(scope="module")
def w4a16(run) -> Path:
    with pytest.raises(SystemExit) as e:
        quantize_cli([f"ckpt={run / 'folded'}", "scheme=w4a16", "group_size=16", "min_agreement=0.8", f"out={run / 'q4'}", *CHECK])
    assert e.value.code == 0
    return run / "q4"


def stored(path: Path) -> dict[str, str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_the_schemes_are_the_declared_choices():
    assert tuple(SCHEMES) == QUANT_SCHEMES


def test_w8a8_stores_every_factor_as_int8_and_nothing_else(w8a8):
    dtypes = stored(w8a8)
    factors = {k: v for k, v in dtypes.items() if k.endswith((".A.weight", ".B.weight"))}
    assert len(factors) == FACTORS and set(factors.values()) == {"I8"}
    assert all(dtypes[k.replace(".weight", ".weight_scale")] == "F32" for k in factors)  # one scale per output row
    # The embedding, the LM head and the norms keep the model's dtype.
    assert {v for k, v in dtypes.items() if k not in factors and not k.endswith("weight_scale")} == {"F32"}
    config = json.loads((w8a8 / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized" and q["ignore"] == ["lm_head"]
    assert q["config_groups"]["group_0"]["input_activations"]["dynamic"] is True


def test_the_loaded_model_runs_every_factor_quantized(w8a8):
    model, _ = load_model_dir(w8a8)  # what dlr-eval loads (sha256 verified)
    assert factor_count(model) == (FACTORS, FACTORS) and unquantized_linears(model) == []
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == LAYERS
    for m in layers:
        for factor in (m.A, m.B):
            scheme = factor.quantization_scheme
            assert scheme.weights.num_bits == 8 and scheme.input_activations.num_bits == 8
            # Dequantized integers: at most 255 distinct values per output row.
            assert all(len(row.unique()) <= 255 for row in factor.weight)
    assert getattr(model.lm_head, "quantization_scheme", None) is None


def test_w8a8_keeps_the_perplexity_and_greedy_tokens_of_the_trained_model(run, w8a8, capsys):
    report = json.loads((w8a8 / "quantize_report.json").read_text())
    check = report["check"]
    assert report["passed"] and report["factors"] == FACTORS and report["linears"] == FACTORS
    assert check["tokens"] > 3000 and check["ppl_before"] < 10000  # trained: an untrained model scores ~32000
    assert check["ppl_ratio"] <= W8A8_PPL_RATIO and check["top1_agreement"] >= W8A8_AGREEMENT
    # The factors' tensors shrink to a quarter plus one fp32 scale per row; the files by as much.
    pb, wb = report["projection_bytes"], report["weight_bytes"]
    assert pb["after"] < 0.3 * pb["before"] and wb["before"] - wb["after"] > 0.7 * pb["before"]
    # dlr-eval reproduces the check's perplexity (same validation rows; token-weighted).
    code, out, _ = call(eval_cli, [f"ckpt={w8a8}", "data=c4_sample", "eval_tokens=4000", "progress=false", "--json"],
                        capsys)
    assert code == 0 and json.loads(out)["val_ppl"] == pytest.approx(check["ppl_after"], rel=1e-4)


def test_greedy_generation_agrees_with_the_unquantized_model(run, w8a8):
    prompts = torch.tensor([[37, 1530, 12, 8, 2600, 7, 100, 5], [100, 7, 3, 912, 19, 8, 1809, 13]])
    ids = {}
    for name, path in (("fp32", run / "folded"), ("w8a8", w8a8)):
        model, _ = load_model_dir(path)
        ids[name] = model.generate(prompts, max_new_tokens=16, min_new_tokens=16, do_sample=False)[:, 8:]
    assert (ids["fp32"] == ids["w8a8"]).float().mean() >= 0.75


def test_w4a16_packs_every_factor_into_4_bits(w4a16):
    dtypes = stored(w4a16)
    packed = [k for k in dtypes if k.endswith((".A.weight_packed", ".B.weight_packed"))]
    assert len(packed) == FACTORS and {dtypes[k] for k in packed} == {"I32"}
    assert not [k for k in dtypes if k.endswith((".A.weight", ".B.weight"))]
    report = json.loads((w4a16 / "quantize_report.json").read_text())
    assert report["passed"] and report["group_size"] == 16
    assert report["check"]["ppl_ratio"] <= W4A16_PPL_RATIO and report["check"]["top1_agreement"] >= W4A16_AGREEMENT
    assert report["projection_bytes"]["after"] < 0.2 * report["projection_bytes"]["before"]
    model, _ = load_model_dir(w4a16)
    assert factor_count(model) == (FACTORS, FACTORS)
    assert {m.A.quantization_scheme.weights.num_bits for m in model.modules() if isinstance(m, LowRankLinear)} == {4}


def test_the_directory_describes_itself(w8a8):
    card = (w8a8 / "README.md").read_text()
    assert f"{FACTORS} factor matrices" in card and "w8a8" in card
    meta = json.loads((w8a8 / "dlr_checkpoint.json").read_text())
    assert "model.safetensors" in meta["files"] and meta["extra"]["quantized_from"] == "folded"


@pytest.mark.parametrize("args,message", [
    (["ckpt={run}/final"], "quantize the folded one"),
    (["ckpt={run}/folded-w8a8", "out={run}/x"], "already quantized"),
    (["ckpt={run}/folded", "scheme=int3", "out={run}/x"], "scheme='int3' is not valid; accepted: w8a8, w4a16"),
    (["ckpt={run}/folded", "scheme=w4a16", "group_size=32", "out={run}/x"], "accepted: a divisor of 16"),
    (["ckpt={run}/folded", "group_size=16", "out={run}/x"], "applies to scheme=w4a16 only"),
    (["ckpt={run}/folded"], "already exists"),
    (["ckpt={run}/folded", "out={run}/folded/x"], "overlaps"),
    (["ckpt={run}/folded", "min_agreement=2", "out={run}/x"], "min_agreement=2"),
    (["ckpt={run}/folded", "ignore=['re:(']", "out={run}/x"], "valid re: patterns"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, w8a8, capsys, args, message):
    before = sorted(p.name for p in run.iterdir())
    code, _, err = call(quantize_cli, [a.format(run=run) for a in args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_model_outside_the_bounds_is_not_written(run, capsys):
    code, out, err = call(quantize_cli, [f"ckpt={run / 'folded'}", "scheme=w4a16", "min_agreement=1",
                                         f"out={run / 'strict'}", *CHECK], capsys)
    assert code == 1 and "nothing written" in err and "same greedy token" in out
    assert not (run / "strict").exists() and not list(run.glob(".strict*"))


def test_ignore_keeps_the_named_layers_unquantized_and_every_other_factor_quantized(run, capsys):
    """llm-compressor's `ignore`: the B factors of gate and up (a pattern) and one named A stay in the
    model's dtype; everything else is int8, and the report, the card and the reloaded model agree."""
    kept = ["re:.*mlp[.](gate|up)_proj[.]B$", "model.layers.0.self_attn.o_proj.A"]
    listed = ",".join(f"'{k}'" for k in kept)  # quoted: Hydra's grammar reserves ( | [ outside quotes
    code, out, _ = call(quantize_cli, [f"ckpt={run / 'folded'}", f"ignore=[{listed}]", f"out={run / 'kept'}",
                                       *CHECK], capsys)
    assert code == 0 and "kept unquantized" in out
    dtypes = stored(run / "kept")
    factors = {k: v for k, v in dtypes.items() if k.endswith((".A.weight", ".B.weight"))}
    float_factors = sorted(k for k, v in factors.items() if v == "F32")
    assert float_factors == sorted([f"model.layers.{i}.mlp.{p}_proj.B.weight" for i in (0, 1) for p in ("gate", "up")]
                                   + ["model.layers.0.self_attn.o_proj.A.weight"])
    assert {v for k, v in factors.items() if k not in float_factors} == {"I8"}
    report = json.loads((run / "kept" / "quantize_report.json").read_text())
    assert report["ignore"] == kept and report["factors"] == FACTORS - 5
    model, _ = load_model_dir(run / "kept")
    assert factor_count(model, kept) == (FACTORS - 5, FACTORS - 5) and unquantized_linears(model, kept) == []
    assert "but those `ignore` names" in (run / "kept" / "README.md").read_text()


def test_the_dense_export_quantizes_too_every_projection_int8(tmp_path, capsys):
    """The baseline a deployer quantizes: a plain LLaMA (dlr-fold dense=true's format) through the same
    command; every projection is int8, the card is the dense export's, and it loads back as a LlamaForCausalLM."""
    import dlr
    from dlr.artifacts.export import export_dense, save_dense_dir
    from dlr.data import load_tokenizer

    torch.manual_seed(0)
    save_dense_dir(export_dense(dlr.build_model("llama_tiny", "full")), load_tokenizer("t5"), tmp_path / "dense")
    # Random weights: the bounds are for trained models (the tests above).
    code, out, err = call(quantize_cli, [f"ckpt={tmp_path / 'dense'}", "max_ppl_ratio=1e9", "min_agreement=0", *CHECK],
                          capsys)
    assert code == 0 and "dense llama" in out
    assert "it/s" not in out + err and "Compressing model" not in err  # compressed-tensors' bars are held back
    dtypes = stored(tmp_path / "dense-w8a8")
    projections = {k: v for k, v in dtypes.items() if k.endswith("_proj.weight")}
    assert len(projections) == LAYERS and set(projections.values()) == {"I8"}
    model, _ = load_model_dir(tmp_path / "dense-w8a8", dense=True)
    assert type(model).__name__ == "LlamaForCausalLM" and unquantized_linears(model) == []
    card = (tmp_path / "dense-w8a8" / "README.md").read_text()
    assert "Dense export" in card and f"{LAYERS} linear layers (every projection)" in card
