"""dlr-compare --by KEY (95% t-intervals, lowrank band, paired differences) and the named studies."""
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from test_compare import make_run

from dlr.analysis import compare
from experiments import study
from dlr.cli import compare as compare_cli
from dlr.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
LOW = {0: 20.0, 1: 22.0, 2: 21.0}
# dlr at alpha 0.5: clearly lower than lowrank on every seed; alpha 2: a wobble around it.
DLR = {0.5: {0: 19.0, 1: 21.1, 2: 20.0}, 2.0: {0: 20.5, 1: 22.2, 2: 20.9}}


@pytest.fixture
def alpha_sweep(tmp_path):
    root = tmp_path / "sweep"
    for s in range(3):
        make_run(root, f"lowrank-s{s}", LOW[s], method="lowrank", seed=s, alpha=1.0)
        for a, vals in DLR.items():
            make_run(root, f"dlr-a{a}-s{s}", vals[s], method="dlr", seed=s, alpha=a)
    return root


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_t_interval_uses_the_tables_t_quantile(df, expected):
    values = [float(v) for v in range(df + 1)]  # n = df + 1 seeds
    mean, half, n = compare.t_interval(values)
    std = compare.stats(values).std
    assert n == df + 1 and mean == pytest.approx(df / 2)
    assert half == pytest.approx(expected * std / (df + 1) ** 0.5, abs=1e-4 * std)
    assert compare.t_interval([1.0, 2.0], level=0.90)[1] == pytest.approx(6.3138 * 0.5 ** 0.5 / 2 ** 0.5, abs=1e-4)


def test_sweep_points_have_t_intervals_and_paired_differences_to_lowrank(alpha_sweep):
    groups = compare.group_runs(compare.load_runs([str(alpha_sweep)]))
    points = compare.sweep_points(groups, "alpha", "val_ppl")
    assert [(p.group.method, p.value) for p in points] == [("lowrank", None), ("dlr", 0.5), ("dlr", 2.0)]
    low, half, two = points
    assert low.mean == pytest.approx(21.0) and low.n == 3
    assert low.half == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)  # sd of 20, 22, 21 is 1
    diffs = [DLR[0.5][s] - LOW[s] for s in range(3)]
    assert half.baseline.diffs == pytest.approx(tuple(diffs)) and half.baseline.a is low.group
    assert half.diff_half == pytest.approx(4.3027 * statistics.stdev(diffs) / math.sqrt(3), rel=1e-4)
    assert half.verdict == "lower"  # -0.97 ± 0.14
    assert two.verdict == "no difference"  # +0.2 ± 0.4: the interval holds 0


def test_cli_by_alpha_prints_and_writes_the_sweep(alpha_sweep, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "dlr.cli.compare", str(alpha_sweep), "by=alpha", f"out={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "val_ppl by alpha" in proc.stdout and "no difference" in proc.stdout
    rows = list(csv.DictReader((out / "by_alpha.csv").open()))
    assert [(r["alpha"], r["method"], r["n"]) for r in rows] == [("", "lowrank", "3"), ("0.5", "dlr", "3"), ("2.0", "dlr", "3")]
    assert float(rows[1]["diff_to_lowrank_mean"]) == pytest.approx(-0.9666667) and rows[1]["reading"] == "lower"
    assert (out / "by_alpha.png").read_bytes()[:4] == b"\x89PNG" and (out / "by_alpha.md").stat().st_size > 0


def test_by_rank_pairs_each_dlr_rank_with_lowrank_at_that_rank(tmp_path):
    root = tmp_path / "ranks"
    for s in range(2):
        for r in (16, 32):
            make_run(root, f"low-r{r}-s{s}", 30.0 - r / 4 + s, method="lowrank", rank=r, seed=s)
            make_run(root, f"dlr-r{r}-s{s}", 29.0 - r / 4 + s * 1.1, method="dlr", rank=r, seed=s)
    points = compare.sweep_points(compare.group_runs(compare.load_runs([str(root)])), "rank", "val_ppl")
    dlr = [p for p in points if p.group.method == "dlr"]
    assert [p.value for p in dlr] == [16, 32]
    for p in dlr:
        assert p.baseline.a.settings["rank"] == p.value
        assert p.baseline.diffs == pytest.approx((-1.0, -0.9))


def test_categorical_key_and_a_single_seed(tmp_path):
    root = tmp_path / "expand"
    # variance_correction present: a run config from after the knobs (an older one's random_reuse reads as permuted).
    make_run(root, "low-s0", 20.0, method="lowrank", variance_correction=True)
    for e, v in (("uniform", 19.0), ("random_reuse", 19.5), ("permuted", 19.2)):
        make_run(root, f"dlr-{e}-s0", v, method="dlr", expand=e, variance_correction=True)
    points = compare.sweep_points(compare.group_runs(compare.load_runs([str(root)])), "expand", "val_ppl")
    assert [p.value for p in points] == [None, "permuted", "random_reuse", "uniform"]
    assert all(math.isnan(p.half) and p.verdict == "—" for p in points)  # one seed: no interval, no reading
    compare.plot_sweep(points, "expand", "val_ppl", tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 0


def test_unknown_by_key_is_refused_before_anything_is_written(alpha_sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare_cli.main([str(alpha_sweep), "by=alfa", f"out={tmp_path / 'cmp'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "by='alfa'" in err[0] and "alpha" in err[0]
    assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------- studies


def test_the_issue_grid_is_45_distinct_runs_with_alpha_first():
    planned = study.plan(list(study.ORDER), [0, 1, 2])
    assert list(planned) == ["alpha", "variance_correction", "scope", "expand", "rank"]
    assert {k: len(v) for k, v in planned.items()} == {"alpha": 18, "variance_correction": 9, "scope": 12,
                                                        "expand": 12, "rank": 18}
    unique = {r for runs in planned.values() for r in runs}
    assert len(unique) == 45  # the base dlr run (alpha 1, rank 32, ...) and lowrank are shared
    names = [r.name for r in planned["alpha"] if r.seed == 0]
    assert names == ["lowrank-r32-s0", "dlr-r32-a0.25-vc1-all-uniform-s0", "dlr-r32-a0.5-vc1-all-uniform-s0",
                     "dlr-r32-a1-vc1-all-uniform-s0", "dlr-r32-a2-vc1-all-uniform-s0", "dlr-r32-a4-vc1-all-uniform-s0"]
    vc_off = [r for r in planned["variance_correction"] if dict(r.settings).get("variance_correction") is False][0]
    assert "variance_correction=false" in vc_off.overrides()


@pytest.mark.parametrize("studies,values,needle", [
    (["alfa"], None, "study='alfa'"),
    (["alpha", "scope"], "1", "one study"),
    (["variance_correction"], "maybe", "'maybe'"),
])
def test_bad_study_arguments(studies, values, needle):
    with pytest.raises(ConfigError, match=needle):
        study.plan(studies, [0], values)


@pytest.mark.slow
def test_study_runs_renders_bundles_and_skips_finished_runs(tmp_path):
    """A real (tiny) alpha study: 1 seed, 2 values; the second call trains nothing."""
    out = tmp_path / "st"
    args = [sys.executable, "-m", "experiments.study", "alpha", "--model", "llama_tiny", "--steps", "2",
            "--global-batch", "4", "--eval-every", "2", "--seeds", "0", "--values", "0.5,2", "--val-tokens", "1000",
            "--num-workers", "0", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent.name for p in (out / "runs").glob("*/summary.json"))
    assert runs == ["dlr-r16-a0.5-vc1-all-uniform-s0", "dlr-r16-a2-vc1-all-uniform-s0", "lowrank-r16-s0"]
    rows = list(csv.DictReader((out / "studies" / "alpha" / "by_alpha.csv").open()))
    assert [r["alpha"] for r in rows] == ["", "0.5", "2.0"]
    import tarfile

    with tarfile.open(out / "study_bundle.tar.gz") as tar:
        names = tar.getnames()
    assert "study/studies/alpha/by_alpha.png" in names and "study/manifest.json" in names
    assert not any("/final/" in n or "/checkpoints/" in n for n in names)  # no weights
    stamps = {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished before, skipped") == 3
    assert stamps == {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["studies"]["alpha"]["key"] == "alpha" and len(manifest["finished"]) == 3
    # docs/ablations.md is rendered from these files, every number from by_alpha.csv.
    from experiments import render_ablations

    text = render_ablations.render(out, tmp_path / "ablations.md", tmp_path / "ablations")
    assert "Status:** run on CPU" in text and "| 0.5 | dlr | 1 |" in text and "*Not run yet.*" in text
    assert (tmp_path / "ablations" / "alpha" / "by_alpha.png").is_file()


def test_render_ablations_says_plainly_when_no_results_are_in(tmp_path):
    from experiments import render_ablations

    text = render_ablations.render(None, tmp_path / "ablations.md", tmp_path / "ablations")
    assert "not in yet" in text and text.count("*Not run yet.*") == len(study.STUDIES)
    assert not (tmp_path / "ablations").exists()


def test_bundle_keeps_small_files_and_leaves_out_weights_and_token_shards(tmp_path):
    """The one bundle of experiments/study.py and experiments/run_results.py: the archive's root folder
    and whether dlr-prepare's shards go in are its parameters."""
    import tarfile

    out = tmp_path / "results"
    files = ["manifest.json", "compare/table.md", "logs/train.log", "runs/dlr-s0/summary.json",
             "runs/dlr-s0/metrics.jsonl", "runs/dlr-s0/config.yaml", "runs/dlr-s0/final/model.safetensors",
             "runs/dlr-s0/checkpoints/step_2/trainer_state.json", "tokens/manifest.json", "tokens/train-00000.bin",
             "tokens/tokenizer/spiece.model", "eval/dlr-s0-folded.json", "half.json.tmp"]
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text(f)
    small = {"manifest.json", "compare/table.md", "logs/train.log", "runs/dlr-s0/summary.json",
             "runs/dlr-s0/metrics.jsonl", "runs/dlr-s0/config.yaml", "tokens/manifest.json", "eval/dlr-s0-folded.json"}
    shards = {"tokens/train-00000.bin", "tokens/tokenizer/spiece.model"}

    def names(path):
        with tarfile.open(path) as tar:
            return set(tar.getnames())

    # Into `out` itself: the archive leaves itself out.
    assert names(study.bundle(out, out / "study_bundle.tar.gz")) == {f"study/{f}" for f in small | shards}
    (out / "study_bundle.tar.gz").unlink()
    results = study.bundle(out, tmp_path / "b" / "results_bundle.tar.gz", root="results", token_shards=False)
    assert names(results) == {f"results/{f}" for f in small}
    with tarfile.open(results) as tar:
        assert tar.extractfile("results/runs/dlr-s0/summary.json").read() == b"runs/dlr-s0/summary.json"


def test_scaling_grid_is_sizes_x_budgets_x_methods_with_spectron_as_an_option():
    runs = study.plan_scaling("llama_n100k,llama_n300k", "8192,16384", "full,lowrank,dlr,spectron", [0])
    assert len(runs) == 16 and runs[0].name == "llama_n100k-full-t8192-s0"
    spectron = next(r for r in runs if r.method == "spectron")
    assert spectron.overrides() == ["model=llama_n100k", "method=lowrank", "seed=0", "tokens=8192", "optimizer=spectron"]
    assert runs[0].steps(8) == 4 and study.ScalingRun("llama_n100k", "dlr", 5000, 0).steps(8) == 3  # ceil, as the trainer


@pytest.mark.parametrize("sizes,tokens,methods,needle", [
    ("llama_nope", "8192", "full", "--sizes='llama_nope'"),
    ("llama_n100k", "8k", "full", "--tokens='8k'"),
    ("llama_n100k", "0", "full", "positive integers"),
    ("llama_n100k", "8192", "moe", "--methods='moe'"),
])
def test_bad_scaling_grid_arguments(sizes, tokens, methods, needle):
    with pytest.raises(ConfigError, match=needle):
        study.plan_scaling(sizes, tokens, methods, [0])


def test_scaling_zoo_sizes_span_the_range_with_heads_of_32_or_more():
    import dlr
    from dlr.model.sizes import get_size

    names = ("llama_n100k", "llama_n300k", "llama_n800k", "llama_n3m", "llama_n10m", "llama_n20m")
    counts = [dlr.model_stats(dlr.build_model(n, "full", device="meta")).non_embedding_params for n in names]
    assert counts == sorted(counts) and 0.09e6 < counts[0] < 0.11e6 and 15e6 < counts[-1] < 21e6
    for n in names:
        s = get_size(n)
        assert s.hidden_size // s.num_attention_heads >= 32


def test_scaling_dry_run_prints_the_compute_and_a_time_estimate(tmp_path, capsys):
    assert study.main(["scaling", "--dry-run", "--sizes", "llama_n100k", "--tokens", "8192,16384", "--methods", "full",
                       "--global-batch", "8", "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    flops = 13_283_328 * (8192 + 16384)  # llama_n100k full: training FLOPs per token x tokens
    assert f"scaling: 2 runs, {flops:.3g} training FLOPs in all; 2 to train" in out and "assumed for cpu" in out
    assert "llama_n100k-full-t16384-s0" in out and not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="runs alone"):
        study.main(["scaling", "alpha", "--dry-run"])


@pytest.mark.slow
def test_scaling_study_trains_a_real_grid_fits_it_and_skips_it_the_second_time(tmp_path):
    """2 sizes x 3 budgets of real (tiny) training, one method; dlr-scaling fits the 6 points."""
    out = tmp_path / "sc"
    args = [sys.executable, "-m", "experiments.study", "scaling", "--sizes", "llama_n100k,llama_n300k",
            "--tokens", "1024,2048,4096", "--methods", "full", "--global-batch", "2", "--val-tokens", "512",
            "--num-workers", "0", "--device", "cpu", "--at", "1e12", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scaling: 6 runs" in proc.stdout and "assumed for cpu" in proc.stdout
    fit = json.loads((out / "studies" / "scaling" / "fit.json").read_text())
    (group,) = fit["groups"]
    assert group["label"] == "full" and len(group["points"]) == 6
    assert sorted({p["D"] for p in group["points"]}) == [1024, 2048, 4096]
    assert [r["flops"] for r in fit["predictions"]] == [1e12]
    assert (out / "studies" / "scaling" / "loss_vs_compute.png").is_file()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.count("finished before, skipped") == 6
    assert "0 to train" in proc.stdout and "measured on 6 finished run(s)" in proc.stdout
