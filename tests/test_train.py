"""dlr-train end to end on the bundled C4 sample: run dir, resume after SIGKILL, 2 processes, faults."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dlr.config import from_overrides

from dlr.train.loop import TrainingDiverged, train

TINY = ["model=llama_tiny", "data=c4_sample", "global_batch=8", "micro_batch=4", "log_every=1",
        "data.val_tokens=2000", "data.num_workers=0", "eval_every=3", "save_every=2"]


def cfg(*overrides):
    return from_overrides("train", [*TINY, *overrides])


def cli(*args, check=True, timeout=300, launcher=(sys.executable, "-m", "dlr.cli.train")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *TINY, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def records(out_dir, key="loss"):
    lines = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if key in r}


def test_run_dir_contract_and_exact_fold(tmp_path):
    out = tmp_path / "run"
    summary = train(cfg("steps=4", f"out_dir={out}", "method=dlr"))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors", "final/config.json",
                 "folded/model.safetensors", "checkpoints/step_4/trainer_state.json"):
        assert (out / name).exists(), name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["factorization"]["rank"] == 16 and saved["model"]["name"] == "llama_tiny"  # fully resolved
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert {"step", "tokens", "loss", "lr", "tokens_per_s"} <= set(train_recs[0])
    evals = [r for r in lines if "val_ppl" in r]
    assert [r["step"] for r in evals] == [3, 4] and {"val_loss", "val_tokens"} <= set(evals[0])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["val_ppl"] == pytest.approx(summary["val_ppl"])
    assert abs(on_disk["folded_val_ppl"] - on_disk["val_ppl"]) / on_disk["val_ppl"] < 1e-5
    assert on_disk["deploy_params"] == on_disk["train_params"]  # the residual has no parameters
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    # The model directories say where in training they were written (docs/checkpoints.md).
    for name in ("final", "folded"):
        extra = json.loads((out / name / "dlr_checkpoint.json").read_text())["extra"]
        assert (extra["step"], extra["tokens"]) == (4, on_disk["tokens"]) and on_disk["tokens"] == 4 * 8 * 256
    assert extra["folded_from"] == "final"  # a name in the run directory, never a path of this machine


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = ["steps=8", "save_every=2", "eval_every=4", "method=dlr", "data.num_workers=2"]
    cli(*common, f"out_dir={tmp_path / 'straight'}")
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dlr.cli.train", *TINY, *common, f"out_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_4").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    cli(*common, f"out_dir={killed}", "resume=auto")
    assert records(killed) == records(tmp_path / "straight")
    assert records(killed, "val_ppl") == records(tmp_path / "straight", "val_ppl")
    assert len(list((killed / "checkpoints").iterdir())) == 2  # keep_last


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    common = ["steps=4", "method=dlr", "global_batch=8"]
    cli(*common, "micro_batch=4", f"out_dir={tmp_path / 'one'}")
    cli(*common, "micro_batch=2", f"out_dir={tmp_path / 'two'}",
        launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dlr.cli.train"))
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert list(two) == [1, 2, 3, 4]  # only the main process writes: no duplicated records
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    # The schedule advances once per optimizer step, not once per process.
    assert records(tmp_path / "two", "lr") == records(tmp_path / "one", "lr")
    assert records(tmp_path / "two", "val_ppl")[4] == pytest.approx(records(tmp_path / "one", "val_ppl")[4], rel=1e-5)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step_4").glob("data_*.json")) == ["data_0.json", "data_1.json"]
    # The same run under `accelerate launch` (the shipped DDP config, 2 processes): the same run.
    from test_train_fsdp2 import accelerate2

    cli(*common, "micro_batch=2", f"out_dir={tmp_path / 'accelerate'}",
        launcher=accelerate2("ddp.yaml"))
    assert json.loads((tmp_path / "accelerate" / "summary.json").read_text())["processes"] == 2
    via_accelerate = records(tmp_path / "accelerate")
    assert list(via_accelerate) == [1, 2, 3, 4]
    for step in two:
        assert via_accelerate[step] == pytest.approx(two[step], rel=1e-5)


def test_resume_with_spectron_restores_its_state_exactly(tmp_path):
    import shutil

    args = ("steps=4", "save_every=2", "method=dlr", "optimizer=spectron", "lr=0.02")
    train(cfg(*args, f"out_dir={tmp_path / 'straight'}"))
    out = tmp_path / "resumed"
    train(cfg(*args, f"out_dir={out}"))
    shutil.rmtree(out / "checkpoints" / "step_4")  # as if killed after step 2's checkpoint
    (out / "summary.json").unlink()
    train(cfg(*args, f"out_dir={out}", "resume=auto"))
    assert records(out) == records(tmp_path / "straight")  # momentum and power-iteration state restored


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="step_1"):
        train(cfg("steps=6", "save_every=1", "lr=1e12", "warmup=0", "grad_clip=1e30", f"out_dir={out}"))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept and all(p.startswith("step_") for p in kept)
    assert not (out / "summary.json").exists()


def test_stale_partial_checkpoint_is_ignored_on_resume(tmp_path):
    out = tmp_path / "run"
    train(cfg("steps=2", "save_every=2", f"out_dir={out}", "method=lowrank"))
    partial = out / "checkpoints" / ".tmp_step_4"  # what a kill during a save leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    # Same config (steps unchanged), so resume=auto continues from step_2 and finishes.
    train(cfg("steps=2", "save_every=2", f"out_dir={out}", "method=lowrank", "resume=auto"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir()) if not p.name.startswith(".")] == ["step_2"]


# Through the console script's process, one case per stage that refuses (the override check,
# the composed config, the run setup); tests/test_bad_input.py runs every other case in-process.
@pytest.mark.parametrize("override,needle", [
    ("model=llama_9000", "model='llama_9000'"), ("optimizer=spectron method=full", "full"),
    ("resume=/nonexistent/ckpt", "/nonexistent/ckpt"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, override, needle):
    out = tmp_path / "bad"
    proc = cli("steps=2", f"out_dir={out}", *override.split(), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_dry_run_plans_7b_without_allocating():
    plan = train(from_overrides("train", ["model=llama_7b", "dry_run=true", "plan_processes=64"]))
    assert plan["train_params"] == plan["deploy_params"] == 2_820_935_680
    assert (plan["global_batch"], plan["micro_batch"], plan["grad_accum"], plan["steps"]) == (512, 8, 1, 150_000)
    assert plan["memory_estimate_per_process_gib"]["total_gib"] > 40


def test_token_budget_sets_steps():
    plan = json.loads(json.dumps(train(cfg("dry_run=true", "tokens=20480"))))
    assert plan["steps"] == 10 and plan["total_tokens"] == 20480


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    train(cfg("steps=2", f"out_dir={tmp_path / 'a'}", "method=dlr"))
    train(cfg("steps=2", f"out_dir={tmp_path / 'b'}", "method=dlr", "gradient_checkpointing=true"))
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert b == pytest.approx(a, rel=1e-6)


def test_the_plain_loss_trains_like_the_chunked_one(tmp_path):
    """loss=plain (the model's own lm_head and cross-entropy) and the default chunked loss from the
    hidden states: two implementations of one objective, in the trainer's step."""
    train(cfg("steps=2", f"out_dir={tmp_path / 'a'}", "method=dlr"))
    train(cfg("steps=2", f"out_dir={tmp_path / 'b'}", "method=dlr", "loss=plain"))
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["loss_impl"] == "plain"
    assert records(tmp_path / "b") == pytest.approx(records(tmp_path / "a"), rel=1e-5)


def test_compile_gives_the_same_losses(tmp_path):
    train(cfg("steps=2", f"out_dir={tmp_path / 'a'}", "method=dlr"))
    train(cfg("steps=2", f"out_dir={tmp_path / 'b'}", "method=dlr", "compile=true"))
    assert records(tmp_path / "b") == pytest.approx(records(tmp_path / "a"), rel=1e-4)


def test_wandb_offline_logs_and_keeps_its_run_id_on_resume(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    args = ("steps=2", "save_every=1", f"out_dir={out}", "method=lowrank", "logger=wandb")
    train(cfg(*args))
    state = json.loads((out / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    shutil.rmtree(out / "checkpoints" / "step_2")  # as if killed after step 1
    (out / "summary.json").unlink()  # (a finished run is left as it is by resume=auto)
    train(cfg(*args, "resume=auto"))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert state["wandb_id"] and len(runs) == 2
    assert all(r.name.endswith(state["wandb_id"]) for r in runs)  # the resumed run continues the same wandb run
