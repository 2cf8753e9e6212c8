"""Training checkpoints: no pickle anywhere, a corrupt one is one line, a full disk loses nothing."""
import errno
import json
import shutil
import sys

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs
from safetensors import safe_open

from dlr.cli import train as train_cli
from dlr.errors import ConfigError
from dlr.train.loop import train
from test_train import TINY, cfg

ARGS = ("steps=2", "save_every=1", "method=dlr", "eval_every=100")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ts") / "run"
    train(cfg(*ARGS, f"out_dir={out}"))
    return out


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_checkpoint_holds_only_safetensors_and_json(run):
    files = [p for p in (run / "checkpoints" / "step_2").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json"}, files
    for p in files:  # and each really is what its name says (nothing a loader would unpickle)
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            with safe_open(str(p), framework="pt") as f:
                assert list(f.keys())
    names = set()
    for p in (run / "checkpoints" / "step_2" / "state").iterdir():
        with safe_open(str(p), framework="pt") as f:
            names |= set(f.keys())
    # Model weights and AdamW moments, by parameter name: readable without dlr or DCP.
    assert "model.model.layers.0.self_attn.q_proj.B.weight" in names
    assert "optim.model.layers.0.self_attn.q_proj.B.weight.exp_avg_sq" in names


@pytest.mark.parametrize("damage", ["truncate_state", "garbage_json", "missing_optimizer"])
def test_corrupt_checkpoint_is_one_line(run, tmp_path, damage, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    saved = out / "config.yaml"
    saved.write_text(saved.read_text().replace(str(run), str(out)))
    ckpt = out / "checkpoints" / "step_2"
    (out / "summary.json").unlink()
    if damage == "truncate_state":
        shard = next((ckpt / "state").iterdir())
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage_json":
        (ckpt / "trainer_state.json").write_text("{not json")
    else:
        (ckpt / "optimizer.json").unlink()
    before = _snapshot(out)
    # In-process, as the console script calls it (test_train runs that script's process).
    monkeypatch.setattr(sys, "argv", ["dlr-train", *TINY, *ARGS, f"out_dir={out}", "resume=auto"])
    with pytest.raises(SystemExit) as exited:
        train_cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1, err[-20:]
    assert str(ckpt) in err[0] and ("corrupt" in err[0] or "missing" in err[0]), err[0]
    assert _snapshot(out) == before  # nothing written or changed


def test_full_disk_is_one_line_removes_the_partial_write_and_keeps_the_last_checkpoint(run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = dcp_fs._write_files_from_queue
    calls = {"n": 0}

    def disk_fills_up(create_stream, file_queue, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the first checkpoint goes through
            return real(create_stream, file_queue, *args, **kwargs)
        path, _, _ = file_queue.get()
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)  # part of a shard, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dcp_fs, "_write_files_from_queue", disk_fills_up)
    with pytest.raises(ConfigError) as info:
        train(cfg(*ARGS, f"out_dir={out}"))
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert str(out / "checkpoints") in message and "step_1" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]  # no .tmp_step_2 left
    monkeypatch.setattr(dcp_fs, "_write_files_from_queue", real)
    # The kept checkpoint is whole: the run resumes from it and finishes like the uninterrupted one,
    # here under FSDP2 (one process): a DDP checkpoint loads into a sharded model by name.
    train(cfg(*ARGS, f"out_dir={out}", "resume=auto", "parallelism=fsdp2"))
    straight = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx([r["loss"] for r in straight if "loss" in r], rel=1e-6)
