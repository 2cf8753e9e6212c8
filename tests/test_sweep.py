"""A real Hydra multirun of dlr-train (2 methods x 2 seeds), then dlr-compare over the sweep folder."""
import csv
import json
import os
import subprocess
import sys

SWEEP = ["model=llama_tiny", "data=c4_sample", "steps=2", "global_batch=4", "micro_batch=4", "data.val_tokens=1000",
         "data.num_workers=0", "eval_every=2", "save_every=2", "log_every=1"]


def test_multirun_gives_one_run_dir_per_combination_then_compare(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The interpolation is resolved per job, so the base out_dir fans out without clobbering.
    base = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "dlr.cli.train", "-m", "method=lowrank,dlr", "seed=0,1", *SWEEP,
                           f"out_dir={base}/${{method}}-s${{seed}}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["sweep"]  # no multirun.yaml, outputs/ or .hydra/ in the cwd
    runs = sorted(p.name for p in base.iterdir())
    assert runs == ["dlr-s0", "dlr-s1", "lowrank-s0", "lowrank-s1"]
    seen = set()
    for name in runs:
        summary = json.loads((base / name / "summary.json").read_text())
        method, seed = name.split("-s")
        assert (summary["method"], summary["seed"]) == (method, int(seed))
        seen.add((summary["method"], summary["seed"], summary["val_ppl"]))
    assert len(seen) == 4  # four distinct trainings, not one result copied

    out = tmp_path / "compare"
    proc = subprocess.run([sys.executable, "-m", "dlr.cli.compare", str(base), f"out={out}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("table.md", "table.csv", "pairs.csv", "val_ppl_vs_tokens.png", "train_loss_vs_step.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [(r["method"], r["n"], r["seeds"]) for r in rows] == [("lowrank", "2", "0 1"), ("dlr", "2", "0 1")]
    pairs = list(csv.DictReader((out / "pairs.csv").open()))
    assert [int(p["seed"]) for p in pairs] == [0, 1]
    assert "dlr − lowrank" in (out / "table.md").read_text()
