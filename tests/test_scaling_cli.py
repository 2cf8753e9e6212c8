"""dlr-scaling on run directories in dlr-train's format: grouping over sizes, fit.json, tables, plots, refusals."""
import csv
import json
import math

import numpy as np
import pytest
import yaml

from dlr.cli import scaling as scaling_cli
from dlr.model.sizes import recipe

# Zoo names, so their recipes (configs/model/*.yaml; llama_60m's lr differs) are what the grouping looks up;
# (hidden, non-embedding params) are the test's own.
SIZES = {"llama_n100k": (64, 1e5), "llama_130m": (128, 1e6), "llama_60m": (256, 1e7)}
TOKENS = (1e8, 1e9, 1e10)
LAWS = {"full": (1.8, 400.0, 0.34, 400.0, 0.28), "dlr": (1.9, 400.0, 0.34, 400.0, 0.28)}


def make_run(root, size, method, tokens, lr_override=None, seed=0, noise=0.0):
    """summary.json + config.yaml as dlr-train writes them (the keys dlr-scaling reads, and the grouping keys)."""
    hidden, n = SIZES[size]
    lr = lr_override or recipe(size)["lr"]  # a per-size recipe lr: 0.006 for llama_60m, 0.003 for the others
    cfg = {"model": {"name": size, "hidden_size": hidden, "default_rank": hidden // 4},
           "optimizer": {"name": "adamw"}, "method": method, "rank": hidden // 4, "alpha": 1.0,
           "seed": seed, "steps": int(tokens // 131072), "tokens": tokens, "lr": lr, "global_batch": recipe(size)["global_batch"],
           "micro_batch": 8, "eval_every": 100}
    out = root / f"{size}-{method}-t{int(tokens)}-lr{lr}-s{seed}"
    out.mkdir(parents=True)
    cfg["out_dir"] = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    e, a, alpha, b, beta = LAWS[method]
    loss = (e + a * n ** -alpha + b * tokens ** -beta) * (1 + noise)
    fpt = 6 * n + 6 * 32000 * hidden  # the lm_head counts too
    (out / "summary.json").write_text(json.dumps({
        "model": size, "method": method, "seed": seed, "tokens": int(tokens), "val_loss": loss, "val_ppl": math.exp(loss),
        "train_non_embedding_params": int(n), "train_flops_per_token": int(fpt)}))
    return out


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for method in LAWS:
        for size in SIZES:
            for t in TOKENS:
                make_run(root, size, method, t, noise=0.001 * rng.standard_normal())
    return root


def test_fits_one_law_per_method_and_writes_everything(grid, tmp_path, capsys):
    out = tmp_path / "fit"
    assert scaling_cli.scaling_main([str(grid), f"out={out}", "at=1e18,1e20", "bootstrap=8"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "18 run(s) in 2 group(s)" in printed and "dlr − full" in printed
    # What it is doing while it fits (a bootstrap can take minutes), on stderr.
    assert "fitting group 1/2 'full': 9 run(s), then 8 bootstrap refit(s)" in captured.err
    fit = json.loads((out / "fit.json").read_text())
    assert [g["label"] for g in fit["groups"]] == ["full", "dlr"]  # sizes and recipe lrs did not split groups
    for g in fit["groups"]:
        assert len(g["points"]) == 9 and g["law"]["converged"] and g["law"]["bootstrap_samples"] == 8
        assert g["law"]["alpha"] == pytest.approx(0.34, abs=0.1)
        assert set(g["law"]["intervals"]) == {"E", "A", "alpha", "B", "beta"}
        assert g["law"]["flops_per_token"]["n"] == pytest.approx([1e5, 1e6, 1e7])
    full, dlr_ = fit["groups"]
    assert dlr_["law"]["E"] > full["law"]["E"]
    rows = list(csv.DictReader((out / "table.csv").open()))
    preds = [r for r in rows if not r["vs"]]
    assert [(r["group"], float(r["flops"])) for r in preds] == [("full", 1e18), ("full", 1e20), ("dlr", 1e18), ("dlr", 1e20)]
    for r in preds:
        assert float(r["ppl"]) == pytest.approx(math.exp(float(r["loss"])))
        assert float(r["loss_lo"]) <= float(r["loss"]) * 1.01 and float(r["loss"]) <= float(r["loss_hi"]) * 1.01
    diff = [r for r in rows if r["vs"]]
    assert [(r["group"], r["vs"]) for r in diff] == [("dlr", "full")] * 2
    assert float(diff[0]["loss"]) == pytest.approx(0.1, abs=0.05)  # E differs by 0.1
    assert "| dlr − full | 1e+18 |" in (out / "table.md").read_text()
    assert (out / "loss_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "isoflop.png").exists()  # a size x tokens grid has no shared budgets


def test_isoflop_plot_where_the_grid_has_equal_budgets(tmp_path, capsys):
    root = tmp_path / "runs"
    for size in SIZES:
        for t in TOKENS:
            make_run(root, size, "full", t)
    # Three sizes at one budget: C = fpt(N) * D the same within 10%.
    for size, (hidden, n) in SIZES.items():
        fpt = 6 * n + 6 * 32000 * hidden
        make_run(root, size, "full", round(3e17 / fpt))
    out = tmp_path / "fit"
    assert scaling_cli.scaling_main([str(root), f"out={out}", "bootstrap=0"]) == 0
    assert (out / "isoflop.png").read_bytes()[:4] == b"\x89PNG"


def test_a_setting_beyond_size_and_budget_makes_another_group(grid, capsys):
    for size in SIZES:
        for t in TOKENS[:2]:
            make_run(grid, size, "full", t, lr_override=0.01)
    assert scaling_cli.scaling_main([str(grid), "bootstrap=0", "at=1e19"]) == 0
    printed = capsys.readouterr().out
    assert "3 group(s)" in printed and "full lr=0.01" in printed


@pytest.mark.parametrize("extra,needle", [
    (["at=1e18,x"], "at=[1e+18, 'x'] is not valid"),
    (["at=-5"], "positive FLOP budgets"),
    (["bootstrap=-1"], "bootstrap=-1"),
    (["level=2"], "level=2.0"),
    (["levle=0.9"], "unknown setting 'levle'; did you mean 'level'?"),
    (["metric=nope"], "no nope in summary.json"),
    (["--no-runs"], "no run directories given; e.g. dlr-scaling"),
    (["--at", "1e18"], "'--at' is not a setting; settings are key=value; did you mean at=...?"),
    (["plots=maybe"], "plots='maybe'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(grid, tmp_path, capsys, extra, needle):
    out = tmp_path / "fit"
    with pytest.raises(SystemExit) as exit_info:
        scaling_cli.main([*([] if extra == ["--no-runs"] else [str(grid)]), f"out={out}",
                          *(e for e in extra if e != "--no-runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("dlr-scaling: error:"), err
    assert not out.exists()


def test_a_group_with_too_few_points_is_refused_saying_how_many(tmp_path, capsys):
    root = tmp_path / "runs"
    for size in ("llama_n100k", "llama_130m"):
        for t in TOKENS[:2]:
            make_run(root, size, "full", t)
    make_run(root, "llama_n100k", "full", TOKENS[0], seed=1)  # a second seed is not a new point
    out = tmp_path / "fit"
    with pytest.raises(SystemExit) as exit_info:
        scaling_cli.main([str(root), f"out={out}"])
    assert exit_info.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "group 'full' has 4 distinct (N, D) point(s) (5 run(s))" in err and "needs at least 5" in err
    assert not out.exists()


def test_a_group_of_one_model_size_is_refused_naming_what_cannot_be_identified(tmp_path, capsys):
    root = tmp_path / "runs"
    for t in (1e8, 3e8, 1e9, 3e9, 1e10):
        make_run(root, "llama_n100k", "full", t)
    out = tmp_path / "fit"
    with pytest.raises(SystemExit) as exit_info:
        scaling_cli.main([str(root), f"out={out}"])
    assert exit_info.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "group 'full': every point has N=1e+05: E, A and alpha cannot be identified from one N" in err, err
    assert not out.exists()


@pytest.mark.parametrize("loss,shown", [(float("inf"), "inf"), (-1.5, "-1.5"), ("abc", "'abc'")])
def test_a_run_with_a_bad_loss_is_refused_naming_the_run_and_the_value(grid, tmp_path, capsys, loss, shown):
    run = make_run(grid, "llama_n100k", "full", 3e8)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "val_loss": loss}))
    with pytest.raises(SystemExit) as exit_info:
        scaling_cli.main([str(grid), "bootstrap=0"])
    assert exit_info.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert f"{str(run)!r} has val_loss={shown} in summary.json" in err, err
