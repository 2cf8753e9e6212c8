"""dlr-train's run directory under kills, resumes and refusals.

One real run (4 steps, a checkpoint every 2, two data loader workers) is the reference. The
states a kill leaves behind are made from copies of it by removing what the killed process
would not have written yet (every file is written atomically, so a kill leaves it absent or
whole): that reaches each kill point exactly, with no timing involved.
"""
import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from dlr.config import from_overrides
from safetensors.torch import load_file

import dlr
from dlr.cli import train as train_cli
from dlr.train.loop import train
from golden_record import CLOCK_FIELDS


TINY = ["model=llama_tiny", "data=c4_sample", "global_batch=4", "micro_batch=4", "log_every=1",
        "data.val_tokens=1000", "data.num_workers=2", "eval_every=2", "save_every=2", "keep_last=5",
        "steps=4", "method=dlr"]


def cfg(*overrides):
    return from_overrides("train", [*TINY, *overrides])


def metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in CLOCK_FIELDS} for x in lines]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remove(out: Path, *names: str) -> None:
    for name in names:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(cfg(f"out_dir={out}"))
    return out


def copy(straight: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    return out


def test_each_metrics_record_once_after_kills_while_final_and_folded_are_written(straight, tmp_path):
    out = copy(straight, tmp_path)
    expected = metrics(straight)
    assert [r["step"] for r in expected if "val_loss" in r] == [2, 4]
    assert [r["step"] for r in expected if "folded_val_loss" in r] == [4]
    remove(out, "final", "folded", "summary.json")  # killed while final/ was written
    train(cfg(f"out_dir={out}"))
    assert metrics(out) == expected
    remove(out, "folded", "summary.json")  # then killed while folded/ was written
    train(cfg(f"out_dir={out}"))
    assert metrics(out) == expected
    for name in ("final", "folded"):
        assert sha256(out / name / "model.safetensors") == sha256(straight / name / "model.safetensors")


def test_the_rng_state_after_a_resume_is_the_uninterrupted_runs(straight, tmp_path):
    out = copy(straight, tmp_path)
    remove(out, "checkpoints/step_4", "final", "folded", "summary.json")  # killed after step_2
    train(cfg(f"out_dir={out}"))
    assert metrics(out) == metrics(straight)
    for rng in sorted((straight / "checkpoints" / "step_4").glob("rng_*.safetensors")):
        saved, resumed = load_file(rng), load_file(out / "checkpoints" / "step_4" / rng.name)
        assert set(saved) == set(resumed)
        for name in saved:
            assert saved[name].equal(resumed[name]), f"{rng.name}: {name}"


def refused(args: list[str], capfd, monkeypatch) -> str:
    """Run dlr-train in-process: exit code 2 and one stderr line, which is returned."""
    monkeypatch.setattr(sys, "argv", ["dlr-train", *TINY, *args])
    with pytest.raises(SystemExit) as e:
        train_cli.main()
    err = capfd.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("dlr-train: error: "), err
    return err[0]


def test_an_older_checkpoint_format_is_refused_naming_both_versions(straight, tmp_path, capfd, monkeypatch):
    out = copy(straight, tmp_path)
    remove(out, "final", "folded", "summary.json")
    state = out / "checkpoints" / "step_4" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "format_version": 3}))
    line = refused([f"out_dir={out}"], capfd, monkeypatch)
    assert "format_version=3" in line and "accepted: 4" in line


def test_an_older_run_directory_format_is_refused_naming_both_versions(straight, tmp_path, capfd, monkeypatch):
    out = copy(straight, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    del summary["format_version"]
    (out / "summary.json").write_text(json.dumps(summary))
    line = refused([f"out_dir={out}"], capfd, monkeypatch)
    assert "format_version=None" in line and "accepted: 1" in line


@pytest.fixture
def mkdirs(tmp_path):
    """Every directory this process creates below tmp_path, from the interpreter's audit events
    (os.mkdir raises one; Path.mkdir and os.makedirs call it)."""
    made: list[str] = []
    root = str(tmp_path)

    def hook(event, args):
        if event == "os.mkdir" and str(args[0]).startswith(root):
            made.append(str(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed; this one only records below this test's tmp_path
    return made


def data_files(tmp_path: Path, train_name: str, content: bytes) -> list[str]:
    files = tmp_path / "files"
    files.mkdir()
    (files / train_name).write_bytes(content)
    val = sorted((Path(dlr.__file__).parent / "assets" / "c4_sample").glob("c4-validation*.json.gz"))[0]
    shutil.copy(val, files / "val.json.gz")
    return [f"data.train_files={files / train_name}", f"data.validation_files={files / 'val.json.gz'}"]


@pytest.mark.parametrize("source,name,content,needle", [
    ("c4_local", "train.json", b"\n  \n\n", "the train split has no documents"),
    ("c4_local", "train.json.gz", gzip.compress(b""), "the train split has no documents"),
    ("text", "train.txt", b"   \n\n\t\n", "the train split has no documents"),
])
def test_an_empty_train_split_creates_no_out_dir(tmp_path, mkdirs, capfd, monkeypatch, source, name, content, needle):
    args = data_files(tmp_path, name, content)
    mkdirs.clear()  # the data files' own folder above is ours
    out = tmp_path / "new" / "run"
    line = refused([f"data={source}", *args, f"out_dir={out}"], capfd, monkeypatch)
    assert needle in line
    assert not (tmp_path / "new").exists() and not mkdirs


def test_a_checkpoint_of_another_rank_creates_no_out_dir(straight, tmp_path, mkdirs, capfd, monkeypatch):
    out = tmp_path / "new" / "run"
    line = refused([f"out_dir={out}", "rank=8", f"resume={straight}/checkpoints/step_2"], capfd, monkeypatch)
    assert "does not match" in line
    assert not (tmp_path / "new").exists() and not mkdirs


@pytest.mark.parametrize("make_out_dir,needle", [
    (lambda tmp: Path("/proc") / "dlr-run", "not writable"),
    (lambda tmp: tmp / ("x" * 256) / "run", "256 bytes"),
])
def test_an_out_dir_that_cannot_be_created_or_named_is_one_line(tmp_path, mkdirs, capfd, monkeypatch,
                                                                make_out_dir, needle):
    out = make_out_dir(tmp_path)
    line = refused([f"out_dir={out}", "dry_run=false"], capfd, monkeypatch)
    assert needle in line and str(out) in line
    assert not mkdirs and list(tmp_path.iterdir()) == []
