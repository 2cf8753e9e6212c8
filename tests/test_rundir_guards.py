"""Run-directory guards: the lock, a finished run left as it is, a copied run resuming, no
temporaries, one file mode, strict-JSON metrics, no checkpoint with non-finite numbers,
and the sha256 check of model directories."""
import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from dlr.config import from_overrides

from dlr.cli.evaluate import main as eval_cli
from dlr.errors import ConfigError, TrainingDiverged
from dlr.train.finite import checkpoint_is_finite, nonfinite
from dlr.train.loop import train
from dlr.artifacts.run_dir import MetricsLog, RunLock, read_metrics

TINY = ["model=llama_tiny", "data=c4_sample", "global_batch=4", "micro_batch=4", "log_every=1",
        "data.val_tokens=1000", "data.num_workers=0", "eval_every=2", "save_every=2", "method=dlr"]


def cfg(*overrides):
    return from_overrides("train", [*TINY, *overrides])


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.lstat().st_mode, p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


def lines(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("guards") / "run"
    summary = train(cfg("steps=4", f"out_dir={out}"))
    return out, summary


def test_finished_run_has_no_temporaries_and_one_file_mode(finished):
    out, _ = finished
    names = [p.name for p in out.rglob("*")]
    assert not [n for n in names if ".tmp" in n or ".old-" in n or n == ".lock"], names
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert len(modes) == 1, modes  # model.safetensors included
    assert (out / "final" / "model.safetensors").stat().st_mode == (out / "summary.json").stat().st_mode


def test_rerun_of_a_finished_run_changes_nothing(finished):
    out, summary = finished
    before = snapshot(out)
    again = train(cfg("steps=4", f"out_dir={out}", "resume=auto"))
    assert again.pop("already_finished") is True
    assert again["val_ppl"] == summary["val_ppl"] and again["mean_tokens_per_s"] == summary["mean_tokens_per_s"]
    assert snapshot(out) == before  # not a byte, mode or mtime changed; nothing added


def test_second_process_is_refused_by_the_lock_naming_its_pid(finished, tmp_path):
    out = tmp_path / "locked"
    holder = RunLock(out).acquire()
    try:
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            train(cfg("steps=2", f"out_dir={out}"))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.release()
    assert not out.exists() or not any(out.iterdir())


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / ".lock").write_text("999999\n")  # what a SIGKILLed run leaves: the file, no flock
    train(cfg("steps=2", f"out_dir={out}"))
    assert (out / "summary.json").is_file() and not (out / ".lock").exists()


def test_copied_run_resumes_where_it_now_is(finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "elsewhere" / "moved"
    shutil.copytree(out, copy)
    # As if killed right after step 2's checkpoint, then moved: resume from step_2 in the new place.
    for name in ("final", "folded", "checkpoints/step_4"):
        shutil.rmtree(copy / name)
    (copy / "summary.json").unlink()
    resumed = train(cfg("steps=4", f"out_dir={copy}", "resume=auto"))
    assert "already_finished" not in resumed
    assert [r.get("loss") for r in lines(copy)] == [r.get("loss") for r in lines(out)]  # bitwise the same training
    assert (copy / "config.yaml").read_text().count(str(copy)) == 1  # config.yaml names where it is now


def test_metrics_are_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", enabled=True)
    log.write({"step": 1, "loss": 2.0, "grad_norm": float("nan"), "lr": float("inf")})
    rec = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert rec["grad_norm"] is None and rec["lr"] is None and rec["loss"] == 2.0
    assert rec["nonfinite"] == {"grad_norm": "nan", "lr": "inf"}


def test_a_resumed_metrics_log_keeps_exactly_the_lines_its_checkpoint_counted(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in (1, 2, 2, 3):
        log.write({"step": step})
    assert log.lines == 4
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn by a kill
    resumed = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, keep_lines=3)
    assert resumed.lines == 3 and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 2]
    resumed.write({"step": 3})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 2, 3]
    MetricsLog(tmp_path / "metrics.jsonl", enabled=True)  # a fresh run starts a fresh log
    assert read_metrics(tmp_path) == []


def test_no_checkpoint_with_non_finite_weights_and_the_named_one_is_finite(tmp_path):
    # The case: at lr=1e3 the gradient norm turns NaN at step 6 while the loss is still
    # finite (before issue 11/12, checkpoints/step_6 was saved with 105 non-finite tensors). The
    # step is refused before the update, and the save-time check stands behind it.
    out = tmp_path / "diverge"
    with pytest.raises(TrainingDiverged, match="not finite") as e:
        train(cfg("steps=10", "save_every=1", "eval_every=100", "lr=1e3", "warmup=0", f"out_dir={out}"))
    kept = sorted((out / "checkpoints").glob("step_*"))
    assert kept and all(checkpoint_is_finite(c) for c in kept)
    named = Path(str(e.value).split("Last finite checkpoint: ")[1].split(" ")[0])
    assert named == kept[-1] and checkpoint_is_finite(named)
    assert not (out / "summary.json").exists()
    assert all(math.isfinite(v) for r in lines(out) for v in r.values() if isinstance(v, float))


def test_nonfinite_finds_weights_and_optimizer_state():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert nonfinite(model.state_dict().items()) == []
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert nonfinite(model.state_dict().items()) == ["weight"]
    opt.state[model.bias]["exp_avg"][0] = float("inf")
    assert nonfinite([("state", opt.state_dict()["state"])]) == ["state.1.exp_avg"]


def test_sha256_mismatch_is_refused_and_verify_false_skips_it(finished, tmp_path, capsys):
    out, _ = finished
    bad = tmp_path / "flipped"
    shutil.copytree(out / "final", bad)
    w = bad / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0x01  # one bit of one weight: same size, still a valid float
    w.write_bytes(bytes(data))
    meta = json.loads((bad / "dlr_checkpoint.json").read_text())
    assert "model.safetensors" in meta["files"]
    args = [f"ckpt={bad}", "data=c4_sample", "eval_tokens=500", "progress=false"]
    with pytest.raises(SystemExit) as e:
        eval_cli(args)
    assert e.value.code == 2 and "sha256" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_cli([*args, "verify=false"])
    assert e.value.code == 0


@pytest.mark.slow
def test_sigterm_ends_a_run_like_sigint_one_line_lock_freed_checkpoint_kept(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dlr.cli.train", *TINY, "steps=40", "save_every=2",
                             "data.num_workers=2", f"out_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_2").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be terminated"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    # One line, as SIGINT gives (the progress bar shares stderr).
    assert err.count("dlr-train: terminated (SIGTERM)\n") == 1 and "Traceback" not in err, err[-2000:]
    assert not (out / ".lock").exists() and not (out / "summary.json").exists()
    from dlr.train.checkpoint_files import check_checkpoint, checkpoint_dirs

    # The newest complete checkpoint is whole (every file's sha256 as recorded): resume=auto goes on from it.
    assert check_checkpoint(checkpoint_dirs(out)[-1])["step"] >= 2


def test_output_closed_early_ends_quietly(finished):
    """`dlr-<command> --help | head -1` and a command's normal output piped to head: no traceback."""
    import subprocess
    import sys

    out, _ = finished
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = [[m, "--help"] for m in ("train", "evaluate", "fold", "finetune", "prepare", "compare", "scaling")]
    commands.append(["compare", str(out)])  # normal output, the reader gone after one line
    script = "; ".join(f"{sys.executable} -m dlr.cli.{c[0]} {' '.join(c[1:])} | head -c 1 >/dev/null; "
                       "echo ${PIPESTATUS[0]} >&2" for c in commands)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    codes = done.stderr.split()
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr[-3000:]
    assert len(codes) == len(commands) and set(codes) <= {"0", "141"}, done.stderr[-3000:]
