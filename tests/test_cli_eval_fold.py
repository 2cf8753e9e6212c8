"""dlr-fold and dlr-eval end to end on a tiny perturbed DLR checkpoint and the bundled C4 sample."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dlr
from dlr.artifacts.model_dir import load_model_dir, read_config, save_model_dir
from dlr.cli.evaluate import main as eval_cli
from dlr.cli.fold import main as fold_cli
from dlr.data import data_spec, load_tokenizer, validation_batches
from dlr.eval.loss import evaluate

EVAL = ["data=c4_sample", "eval_tokens=2000", "batch_size=4", "progress=false"]


def tiny(**kw) -> dlr.DlrLlamaForCausalLM:
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir with final/ (DLR, random_reuse) and the folded/ that dlr-fold writes by default."""
    root = tmp_path_factory.mktemp("run")
    save_model_dir(tiny(method="dlr", expand="random_reuse", seed=1, alpha=2.0), load_tokenizer("t5"), root / "final")
    with pytest.raises(SystemExit) as e:
        fold_cli([f"ckpt={root / 'final'}"])
    assert e.value.code == 0
    return root


def call(cli, args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(p.name.encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


# ------------------------------------------------------------------------------- fold


def test_fold_writes_a_verified_folded_dir_next_to_final(run):
    folded = run / "folded"
    assert read_config(folded).dlr_folded is True
    rep = json.loads((folded / "fold_report.json").read_text())
    assert rep["passed"] and rep["layers_folded"] == 14 and rep["kind"] == "fold"
    assert rep["check"]["tokens"] > 0 and rep["check"]["dtype"] == "fp32"
    assert rep["check"]["max_rel_diff"] <= 1e-4 and rep["check"]["max_abs_diff"] < 1e-3
    assert rep["params"]["equal"] and rep["params"]["after"] == rep["params"]["reference"]
    assert rep["forward_flops_per_token"]["equal"]
    # The plain low-rank model of the same size and rank, counted independently here.
    ref = dlr.model_stats(dlr.build_model("llama_tiny", "lowrank", device="meta"), rep["check"]["seq_len"])
    assert rep["params"]["after"] == ref.total_params
    assert rep["forward_flops_per_token"]["after"] == ref.forward_flops_per_token


def test_fold_never_touches_the_input_and_refuses_to_overwrite(run, tmp_path, capsys):
    before = digest(run / "final")
    code, _, err = call(fold_cli, [f"ckpt={run / 'final'}"], capsys)  # folded/ exists already
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    for out in (run / "final", run / "final" / "sub", run):
        code, _, err = call(fold_cli, [f"ckpt={run / 'final'}", f"out={out}", "overwrite=true"], capsys)
        assert code == 2 and "overlaps the input" in err
    code, out, _ = call(fold_cli, [f"ckpt={run / 'final'}", f"out={tmp_path / 'f2'}", "batch_size=1", "check_batches=1"], capsys)
    assert code == 0 and "max rel diff" in out and (tmp_path / "f2" / "fold_report.json").is_file()
    assert digest(run / "final") == before


@pytest.mark.parametrize("which", ["folded", "lowrank", "full"])
def test_nothing_to_fold_says_so_and_exits_cleanly(run, tmp_path, capsys, which):
    if which == "folded":
        ckpt = run / "folded"
    else:
        ckpt = save_model_dir(tiny(method=which), load_tokenizer("t5"), tmp_path / which)
    listing = sorted(os.listdir(ckpt.parent))
    code, out, err = call(fold_cli, [f"ckpt={ckpt}"], capsys)
    assert code == 0 and "nothing to fold" in out
    assert ("already folded" if which == "folded" else f"a {which} checkpoint") in out
    assert sorted(os.listdir(ckpt.parent)) == listing  # nothing written


def test_dense_flag_exports_identity_and_refuses_silu(run, tmp_path, capsys):
    code, _, err = call(fold_cli, [f"ckpt={run / 'final'}", "dense=true", f"out={tmp_path / 'd'}"], capsys)
    assert code == 2 and "activation=identity" in err and "silu" in err and not (tmp_path / "d").exists()
    ident = save_model_dir(tiny(method="dlr", activation="identity"), load_tokenizer("t5"), tmp_path / "id")
    code, out, err = call(fold_cli, [f"ckpt={ident}", "dense=true", "check_batches=1"], capsys)
    assert code == 0, err
    dense = tmp_path / "id-dense"
    rep = json.loads((dense / "fold_report.json").read_text())
    assert rep["kind"] == "dense" and rep["passed"] and rep["params"]["equal"]
    assert json.loads((dense / "config.json").read_text())["model_type"] == "llama"


# ------------------------------------------------------------------------------- eval


def test_eval_matches_the_trainer_path_and_folded_agrees(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing but out= may appear in the cwd
    code, out, err = call(eval_cli, [f"ckpt={run / 'final'}", *EVAL, "out=final.json"], capsys)
    assert code == 0, err
    assert out.startswith("val_ppl=") and " val_loss=" in out and " tokens=" in out
    code, out, err = call(eval_cli, [f"ckpt={run / 'folded'}", *EVAL, "--json"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["final.json"]
    a = json.loads((tmp_path / "final.json").read_text())
    b = json.loads(out)
    assert {"val_ppl", "val_loss", "tokens"} <= set(a) and a["tokens"] == b["tokens"] > 1500
    assert abs(a["val_loss"] - b["val_loss"]) <= 1e-4 * a["val_loss"]
    assert abs(a["val_ppl"] - b["val_ppl"]) <= 1e-4 * a["val_ppl"]
    # The trainer's final eval: same helpers, same budget -> the same number.
    model, tok = load_model_dir(run / "final")
    data = yaml.safe_load((Path(dlr.__file__).parent.parent / "configs/data/c4_sample.yaml").read_text())
    data["val_tokens"] = 2000
    ref = evaluate(model, validation_batches(data_spec(data), tok, 4), "cpu")  # batch_size=4, as EVAL
    assert ref["val_tokens"] == a["tokens"]
    assert a["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-9)


@pytest.mark.parametrize("args,needle", [
    (["ckpt=/nonexistent/ck"], "does not exist"),
    ([], "ckpt is required"),
    (["ckpt={final}", "data=nope"], "data='nope' is not valid; accepted: c4, c4_local, c4_sample, dclm, fineweb, fineweb_edu, hub, mix, slimpajama, text, tokens"),
    (["ckpt={final}", "bogus=1"], "bogus"),
    (["ckpt={final}", "dtype=fp64"], "dtype='fp64'"),
    (["ckpt={final}", "eval_tokens=0"], "eval_tokens=0"),
    (["ckpt={final}", "data=c4_local"], "data.train_files is required"),
    (["ckpt={final}", "data=text", "data.validation_files=/nonexistent/*.txt"], "/nonexistent"),
    (["ckpt={tmp}"], "no config.json"),
])
def test_eval_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, args, needle):
    args = [a.format(final=run / "final", tmp=tmp_path) for a in args] + ["progress=false", f"out={tmp_path / 'r.json'}"]
    code, out, err = call(eval_cli, args, capsys)
    assert code == 2 and out == ""
    assert err.startswith("dlr-eval: error: ") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.json").exists()


def test_fold_bad_input(tmp_path, capsys):
    code, _, err = call(fold_cli, [f"ckpt={tmp_path / 'nope'}"], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_processes_give_the_same_number(run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dlr.cli.evaluate", f"ckpt={run / 'final'}", *EVAL, f"out={tmp_path / 'two.json'}"]
    # No timeout: how long two processes take to start and rendezvous depends on the machine's load.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val_ppl=") == 1  # only rank 0 prints
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_processes"] == 2
    one = subprocess.run([sys.executable, "-m", "dlr.cli.evaluate", f"ckpt={run / 'final'}", *EVAL, "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    one = json.loads(one.stdout)
    assert two["tokens"] == one["tokens"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
