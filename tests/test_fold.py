"""dlr.fold_and_verify, the library call behind dlr-fold: a typed report, the same one on disk."""
import dataclasses
import inspect
import json
import os

import pytest

from dlr.cli.fold import main as fold_cli
from dlr.errors import ConfigError
from dlr.artifacts.fold import FoldReport, fold_and_verify, nothing_to_fold
from dlr.data import load_tokenizer
from dlr.artifacts.model_dir import read_config, save_model_dir
from dlr.config import FoldConfig
from test_cli_eval_fold import call, run, tiny  # noqa: F401  (run: the module-scoped tiny final/ + folded/ fixture)


def test_the_report_is_the_fold_report_on_disk(run, tmp_path):
    report = fold_and_verify(run / "final", tmp_path / "f", check_batches=1, batch_size=1)
    assert isinstance(report, FoldReport) and report.passed and report.layers_folded == 14
    assert report.output == str(tmp_path / "f") and report.kind == "fold"
    assert report.check.batches == 1 and report.check.max_rel_diff <= report.check.tolerance == 1e-4
    assert report.params.equal and report.params.after == report.params.reference
    # On disk the directories are named, not located: a published directory holds no path of this machine.
    on_disk = {**report.to_dict(), "input": "final", "output": "f"}
    assert json.loads((tmp_path / "f" / "fold_report.json").read_text()) == on_disk
    assert read_config(tmp_path / "f").dlr_folded


def test_a_failed_check_writes_nothing_and_the_cli_says_so(tmp_path, capsys):
    # W = B A in one GEMM rounds differently from B (A x): a dense export is never bitwise, so a
    # tolerance below its last-bit differences must fail (the fold proper is often exact).
    ident = save_model_dir(tiny(method="dlr", activation="identity"), load_tokenizer("t5"), tmp_path / "id")
    report = fold_and_verify(ident, tmp_path / "f", dense=True, check_batches=1, batch_size=1, tolerance=1e-30)
    assert report.check.max_rel_diff > 1e-30 and not report.passed and report.seconds["total"] is None
    assert report.check.max_rel_diff < 1e-4  # a real export, only held to an impossible tolerance
    assert not (tmp_path / "f").exists()
    code, out, err = call(fold_cli, [f"ckpt={ident}", "dense=true", f"out={tmp_path / 'g'}", "check_batches=1",
                                     "batch_size=1", "tolerance=1e-30"], capsys)
    assert code == 1 and "max rel diff" in out and "wrote" not in out
    assert err.strip() == "dlr-fold: verification failed (see above); nothing written"
    assert not (tmp_path / "g").exists()


def test_nothing_to_fold_is_a_reason_and_a_refusal(run, tmp_path):
    assert nothing_to_fold(run / "final") is None
    why = nothing_to_fold(run / "folded")
    assert "is already folded" in why
    listing = sorted(os.listdir(run))
    with pytest.raises(ConfigError, match="nothing to fold: .* is already folded"):
        fold_and_verify(run / "folded", tmp_path / "x")
    with pytest.raises(ConfigError, match="already exists; pass overwrite=true"):
        fold_and_verify(run / "final")  # the default out, run/folded, is there
    assert sorted(os.listdir(run)) == listing and not (tmp_path / "x").exists()


def test_library_defaults_are_the_settings_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(FoldConfig)}
    params = inspect.signature(fold_and_verify).parameters
    for name in ("out", "overwrite", "dense", "check_batches", "batch_size", "tolerance", "device", "verify"):
        assert params[name].default == defaults[name], name


@pytest.mark.parametrize("method,knobs,expected", [
    ("full", {}, False), ("lowrank", {}, False), ("lowrank", {"latent_alpha": 8.0}, True),
    ("lowrank", {"trainable_latent_scale": True}, True), ("dlr", {}, True)])
def test_what_is_foldable_is_one_answer_for_dlr_fold_and_the_trainer(tmp_path, method, knobs, expected):
    """dlr-fold refuses exactly what the trainer does not fold; a latent scale on lowrank folds into B."""
    from dlr.config import from_overrides
    from dlr.train.loop import train

    ckpt = save_model_dir(tiny(method=method, **knobs), load_tokenizer("t5"), tmp_path / "d")
    assert (nothing_to_fold(ckpt) is None) is expected
    if method != "lowrank" or not knobs.get("trainable_latent_scale"):
        return  # one real run: the case where the trainer and dlr-fold disagreed
    args = [f"{k}={str(v).lower()}" for k, v in knobs.items()]
    summary = train(from_overrides("train", ["model=llama_tiny", "data=c4_sample", "steps=2", "global_batch=4",
                                             "micro_batch=4", "data.val_tokens=1000", "data.num_workers=0",
                                             f"method={method}", *args, f"out_dir={tmp_path / 'run'}"]))
    assert nothing_to_fold(tmp_path / "run" / "final") is None and read_config(tmp_path / "run" / "folded").dlr_folded
    assert summary["folded_layers"] == 14 and summary["fold_rel_ppl_diff"] < 1e-5
    assert summary["deploy_params"] == summary["train_params"] - 14  # one latent scale per layer, folded into B
