"""dlr-compare on synthetic run directories: grouping, mean/std/n, paired differences, bad input."""
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlr.analysis import compare
from dlr.cli import compare as compare_cli
from dlr.errors import ConfigError

BASE = {
    "model": {"name": "llama_tiny", "hidden_size": 64, "default_rank": 16},
    "data": {"seq_len": 256, "mode": "paper", "num_workers": 2, "val_tokens": 1000},
    "optimizer": {"name": "adamw"},
    "method": "dlr", "rank": 16, "alpha": 1.0, "activation": "silu", "expand": "uniform", "scope": "all",
    "seed": 0, "steps": 10, "lr": 0.003, "global_batch": 8, "micro_batch": 4, "eval_every": 5,
    "log_every": 1, "precision": "auto",
}


def make_run(root: Path, name: str, val_ppl: float, curve=(30.0, 20.0), **overrides) -> Path:
    """A finished run dir as the trainer writes it (config.yaml, metrics.jsonl, summary.json)."""
    cfg = json.loads(json.dumps(BASE))
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    out = root / name
    out.mkdir(parents=True)
    cfg["out_dir"] = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = [{"step": s, "tokens": s * 2048, "loss": 10.0 - s * 0.1 - cfg["seed"] * 0.01} for s in range(1, 11)]
    records += [{"step": 5, "tokens": 5 * 2048, "val_ppl": curve[0] + cfg["seed"]},
                {"step": 10, "tokens": 10 * 2048, "val_ppl": curve[1] + cfg["seed"]}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    deploy = 1000 if cfg["method"] != "full" else 5000
    summary = {"model": "llama_tiny", "method": cfg["method"], "rank": cfg["rank"], "alpha": cfg["alpha"],
               "seed": cfg["seed"], "optimizer": "adamw", "steps": cfg["steps"], "tokens": cfg["steps"] * 2048,
               "val_ppl": val_ppl, "val_loss": math.log(val_ppl), "deploy_params": deploy, "train_params": deploy,
               "mean_tokens_per_s": 1000.0 + cfg["seed"]}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


LOW = {0: 20.0, 1: 22.0, 2: 21.0}
DLR = {0: 19.0, 1: 21.5, 2: 19.6}


@pytest.fixture
def sweep(tmp_path):
    for s in range(3):
        make_run(tmp_path / "sweep", f"lowrank-s{s}", LOW[s], method="lowrank", seed=s, micro_batch=2 + s)
        make_run(tmp_path / "sweep", f"dlr-s{s}", DLR[s], method="dlr", seed=s, data__num_workers=s)
    return tmp_path / "sweep"


def test_groups_ignore_seed_out_dir_and_runtime_keys(sweep):
    groups = compare.group_runs(compare.load_runs([str(sweep)]))
    assert [g.method for g in groups] == ["lowrank", "dlr"]
    assert [g.seeds for g in groups] == [[0, 1, 2], [0, 1, 2]]
    assert all("seed" not in g.settings and "out_dir" not in g.settings for g in groups)


def test_different_setting_makes_another_group(sweep, tmp_path):
    make_run(sweep, "dlr-a05-s0", 18.0, method="dlr", alpha=0.5)
    make_run(sweep, "lowrank-lr-s0", 18.0, method="lowrank", lr=0.01)
    groups = compare.group_runs(compare.load_runs([str(sweep)]))
    assert len(groups) == 4
    assert "alpha" in compare.varying_keys(groups) and "lr" in compare.varying_keys(groups)


def test_full_ignores_rank_alpha_when_grouping(tmp_path):
    make_run(tmp_path, "full-s0", 15.0, method="full", seed=0, rank=16)
    make_run(tmp_path, "full-s1", 16.0, method="full", seed=1, rank=32, alpha=2.0)
    groups = compare.group_runs(compare.load_runs([str(tmp_path)]))
    assert len(groups) == 1 and groups[0].seeds == [0, 1]


def test_mean_std_n(sweep):
    groups = compare.group_runs(compare.load_runs([str(sweep / "*")]))
    low, dlr = groups
    st = compare.group_stats(low, "val_ppl")
    assert st.n == 3
    assert st.mean == pytest.approx(statistics.fmean(LOW.values()))
    assert st.std == pytest.approx(statistics.stdev(LOW.values()))  # sample std, ddof=1
    one = compare.stats([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.std)
    assert compare.stats([]).n == 0


def test_paired_difference_by_seed(sweep):
    # A run whose seed has no partner must be left out of the pairing, not mis-paired.
    make_run(sweep, "dlr-s7", 5.0, method="dlr", seed=7)
    groups = compare.group_runs(compare.load_runs([str(sweep)]))
    (pair,) = compare.paired_differences(groups, "val_ppl")
    assert (pair.a.method, pair.b.method) == ("lowrank", "dlr")
    assert pair.seeds == (0, 1, 2)
    diffs = [DLR[s] - LOW[s] for s in range(3)]
    assert pair.diffs == pytest.approx(tuple(diffs))
    assert pair.mean == pytest.approx(statistics.fmean(diffs))
    assert pair.stderr == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))


def test_no_pairing_when_more_than_method_differs(tmp_path):
    make_run(tmp_path, "low", 20.0, method="lowrank")
    make_run(tmp_path, "dlr", 19.0, method="dlr", steps=20)
    groups = compare.group_runs(compare.load_runs([str(tmp_path)]))
    assert len(groups) == 2 and compare.paired_differences(groups, "val_ppl") == []


def test_curves_average_over_seeds(sweep):
    low = compare.group_runs(compare.load_runs([str(sweep)]))[0]
    xs, mean, std, ns = compare.curve(low, "val_ppl", "tokens")
    assert xs == [5 * 2048, 10 * 2048] and ns == [3, 3]
    assert mean == pytest.approx([31.0, 21.0]) and std == pytest.approx([1.0, 1.0])


def test_cli_writes_table_csv_and_plots(sweep, tmp_path, capsys):
    # In process, through the entry point's exit code: no subprocess timeout to trip on a loaded machine.
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exit_info:
        compare_cli.main([str(sweep), f"out={out}"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    assert "n=3" in captured.out and "standard error" in captured.out
    assert "Tight layout not applied" not in captured.err
    for name in ("table.md", "table.csv", "pairs.csv", "val_ppl_vs_tokens.png", "train_loss_vs_step.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["method"] for r in rows] == ["lowrank", "dlr"]
    assert float(rows[0]["val_ppl_mean"]) == pytest.approx(21.0) and rows[0]["n"] == "3"
    assert rows[1]["deploy_params"] == "1000"
    pairs = list(csv.DictReader((out / "pairs.csv").open()))
    assert [int(p["seed"]) for p in pairs] == [0, 1, 2]
    assert (out / "val_ppl_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("make_args,needle", [
    (lambda t: [], "no run directories"),
    (lambda t: [str(t / "missing")], "does not exist"),
    (lambda t: [str(t / "empty")], "is not a run directory"),
    (lambda t: [str(t / "unfinished")], "unfinished run"),
    (lambda t: [str(t / "nomatch-*")], "matches nothing"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, make_args, needle):
    # In-process (a subprocess per case costs seconds of torch import); the CLI test above covers the entry point.
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("method: dlr\n")
    with pytest.raises(SystemExit) as exit_info:
        compare_cli.main(make_args(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("dlr-compare: error:"), err


def test_unknown_metric_is_refused(sweep):
    with pytest.raises(ConfigError, match="nope"):
        compare_cli.compare_main([str(sweep), "metric=nope"])


def test_labels_name_only_the_keys_that_differ_shortest_first(tmp_path):
    make_run(tmp_path, "a", 20.0, method="dlr", alpha=0.5)
    make_run(tmp_path, "b", 19.0, method="dlr", alpha=2.0, model__name="llama_demo", model__default_rank=32,
             model__hidden_size=128, rank=32, expand="permuted")
    groups = compare.group_runs(compare.load_runs([str(tmp_path)]))
    labels = [compare.label(g, compare.varying_keys(groups)) for g in groups]
    # The model's name stands for its dimensions; leaves stand for dotted keys; shortest first.
    assert labels == ["dlr rank=32 alpha=2 model=llama_demo expand=permuted", "dlr rank=16 alpha=0.5 model=llama_tiny expand=uniform"]


def test_label_names_on_nested_keys():
    names = compare.label_names(["factorization.alpha", "schedule.steps", "model.name", "model.hidden_size",
                                 "optimizer.name", "optimizer.lr", "schedule.lr", "data.seq_len", "a.seq_len"])
    assert names == {"model.name": "model", "schedule.lr": "lr", "factorization.alpha": "alpha",
                     "schedule.steps": "steps", "optimizer.name": "optimizer", "a.seq_len": "a.seq_len",
                     "data.seq_len": "data.seq_len"}
    assert list(names.values()) == sorted(names.values(), key=lambda v: (len(v), v))


def test_plots_keep_long_legends_whole(tmp_path):
    """The legend sits outside the axes and the PNG grows to hold it (nothing cut off, no layout warning)."""
    import warnings

    from PIL import Image

    for i, a in enumerate((0.25, 0.5, 1.0, 2.0, 4.0)):
        make_run(tmp_path / "runs", f"dlr-{i}", 20.0 + i, method="dlr", alpha=a, expand="random_reuse",
                 model__name=f"llama_a_rather_long_model_name_{i}")
    groups = compare.group_runs(compare.load_runs([str(tmp_path / "runs")]))
    (tmp_path / "out").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (path, _) = compare.plot_curves(groups, tmp_path / "out")
    assert Image.open(path).size[0] > 7 * 120  # wider than the 7-inch axes figure: the legend is outside
