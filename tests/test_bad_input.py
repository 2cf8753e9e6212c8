"""Bad input to any of the four commands: exit code 2, one line naming the value, nothing changed.

One real finished run directory (llama_tiny, 2 steps) is the target of every case; after each
case every file in it must be byte-identical, with the same mode, and no file added or removed.
The commands run in-process (their `main`), exactly as the console scripts call them.
"""
import hashlib
import shutil
import sys
from pathlib import Path

import pytest

from dlr.cli import compare as compare_cli
from dlr.cli import evaluate as eval_cli
from dlr.cli import finetune as finetune_cli
from dlr.cli import fold as fold_cli
from dlr.cli import prepare as prepare_cli
from dlr.cli import scaling as scaling_cli
from dlr.cli import train as train_cli

# Where nothing can be written, even by root: a kernel pseudo-filesystem.
UNWRITABLE = "/proc/dlr-out"

TINY = ["model=llama_tiny", "data=c4_sample", "global_batch=4", "micro_batch=4", "log_every=1",
        "data.val_tokens=1000", "data.num_workers=0", "eval_every=2", "save_every=2", "steps=2", "method=dlr"]
EVAL = ["data=c4_sample", "eval_tokens=1000", "batch_size=4", "progress=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run dir (config.yaml, metrics.jsonl, checkpoints/step_2, final/, folded/, summary.json)."""
    from dlr.config import from_overrides

    from dlr.train.loop import train

    root = tmp_path_factory.mktemp("bad")
    out = root / "run"
    train(from_overrides("train", [*TINY, f"out_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def files(run):
    """Bad data files next to the run: an empty one, a truncated .gz, plain text, a regular file."""
    d = run.parent / "files"
    d.mkdir()
    (d / "empty.json").write_text("")
    good = sorted((Path(__import__("dlr").__file__).parent / "assets" / "c4_sample").glob("c4-train*.json.gz"))[0]
    blob = good.read_bytes()
    (d / "truncated.json.gz").write_bytes(blob[: len(blob) // 2])
    (d / "notjson.json").write_text("this is not json\n")
    (d / "afile").write_text("x")
    val = sorted(good.parent.glob("c4-validation*.json.gz"))[0]
    (d / "val.json.gz").write_bytes(val.read_bytes())
    # Corpora in the other formats: a Parquet file without the text column, an empty .jsonl.zst.
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    pq.write_table(pa.table({"content": ["a document"]}), d / "nofield.parquet")
    (d / "empty.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    (d / "corpus.csv").write_text("text\na document\n")
    # A model dir whose one weight byte is flipped: same size, different sha256.
    shutil.copytree(run / "final", d / "flipped")
    w = d / "flipped" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0x01
    w.write_bytes(bytes(data))
    # A killed run (no summary.json, no final/) whose config.yaml is not YAML; finished runs
    # whose config.yaml is a YAML list, whose summary.json holds a val_loss that is no number.
    killed = d / "killed"
    shutil.copytree(run, killed, ignore=shutil.ignore_patterns("final", "folded", "summary.json"))
    (killed / "config.yaml").write_text("model: {name: [llama_tiny\n")
    for name, edit in (("listed", lambda r: (r / "config.yaml").write_text("- model\n- method\n")),
                       ("textloss", lambda r: (r / "summary.json").write_text(
                           (r / "summary.json").read_text().replace('"val_loss": ', '"val_loss": "abc", "x": ')))):
        shutil.copytree(run, d / name, ignore=shutil.ignore_patterns("checkpoints", "final", "folded"))
        edit(d / name)
    return d


def snapshot(d: Path) -> dict:
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
    return out


def invoke(command: str, args: list[str], monkeypatch) -> int:
    with pytest.raises(SystemExit) as e:
        if command == "train":
            monkeypatch.setattr(sys, "argv", ["dlr-train", *args])
            train_cli.main()
        elif command == "eval":
            eval_cli.main(args)
        elif command == "fold":
            fold_cli.main(args)
        elif command in ("prepare", "scaling", "finetune"):
            {"prepare": prepare_cli, "scaling": scaling_cli, "finetune": finetune_cli}[command].main(args)
        else:
            compare_cli.main(args)
    return e.value.code


T = "train"
CASES = [
    # dlr-train: unknown keys (with the closest name), types, ranges, choices
    (T, ["+lrr=0.1"], "'lrr'; did you mean 'lr'"),
    (T, ["+data.seq_lenn=512"], "'data.seq_lenn'; did you mean 'data.seq_len'"),
    (T, ["+optimizer.momentun=0.5"], "'optimizer.momentun'"),
    (T, ["optimizer=spectron", "+optimizer.momentun=0.5"], "did you mean 'optimizer.momentum'"),
    (T, ["foo=1"], "'foo'"),
    (T, ["+model.foo=1"], "'model.foo'"),
    (T, ["grad_clip=-1"], "grad_clip=-1"),
    (T, ["keep_last=-1"], "keep_last=-1"),
    (T, ["out_dir="], "out_dir=''"),
    (T, ["eval_every=0"], "eval_every=0"),
    (T, ["save_every=0"], "save_every=0"),
    (T, ["log_every=0"], "log_every=0"),
    (T, ["steps=abc"], "steps='abc'"),
    (T, ["lr=-1"], "lr=-1"),
    (T, ["warmup=1.5"], "warmup=1.5"),
    (T, ["min_lr_ratio=2"], "min_lr_ratio=2"),
    (T, ["tokens=-5"], "tokens=-5"),
    (T, ["method=sparse"], "method='sparse'"),
    (T, ["rank=100"], "rank=100"),
    (T, ["alpha=-1"], "alpha=-1"),
    (T, ["activation=tanh"], "activation='tanh'"),
    (T, ["expand=sideways"], "expand='sideways'"),
    (T, ["scope=ffn"], "scope='ffn'"),
    (T, ["micro_batch=3"], "micro_batch=3"),
    (T, ["precision=fp16"], "precision='fp16'"),
    (T, ["logger=tensorboard"], "logger='tensorboard'"),
    (T, ["wandb.mode=sometimes"], "wandb.mode='sometimes'"),
    (T, ["dry_run=maybe"], "dry_run='maybe'"),
    (T, ["trainable_alpha=yes"], "trainable_alpha='yes'"),
    (T, ["model=llama_9000"], "model='llama_9000'"),
    (T, ["data=nope"], "data='nope'"),
    (T, ["optimizer=sgd"], "optimizer='sgd'"),
    (T, ["optimizer.betas=[2,3]"], "optimizer.betas"),
    (T, ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1"),
    (T, ["data.seq_len=1"], "data.seq_len=1"),
    (T, ["data.num_workers=-1"], "data.num_workers=-1"),
    (T, ["model.hidden_size=abc"], "model.hidden_size='abc'"),
    (T, ["-m", "seed=0,abc"], "seed='abc'"),
    (T, ["compile=maybe"], "compile='maybe'"),
    (T, ["loss=fast"], "loss='fast'"),
    (T, ["latent_alpha=-1"], "latent_alpha=-1"),
    (T, ["latent_alpha=1", "trainable_latent_scale=true"], "latent_alpha=1.0"),
    (T, ["+variance_corection=false"], "did you mean 'variance_correction'"),
    # dry_run checks the optimizer, resume and interval settings too
    (T, ["dry_run=true", "optimizer=spectron", "method=full"], "method='full'"),
    (T, ["dry_run=true", "resume=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (T, ["dry_run=true", "plan_processes=0"], "plan_processes=0"),
    (T, ["optimizer=spectron", "parallelism=fsdp2"], "optimizer=spectron is not supported with parallelism='fsdp2'"),
    # the run directory and the data, checked before anything is written
    (T, ["resume=never"], "resume='never'"),
    (T, ["out_dir={files}/new", "rank=8", "resume={run}/checkpoints/step_2"], "differs in: rank: 16 -> 8"),
    (T, ["lr=0.1"], "differs in: lr"),
    (T, ["out_dir={files}/afile"], "is a file"),
    (T, ["out_dir={files}/afile/sub"], "cannot be created"),
    (T, ["out_dir={files}/new", "data=c4_local", "data.train_files={files}/empty.json",
      "data.validation_files={files}/val.json.gz"], "empty"),
    (T, ["out_dir={files}/new", "data=c4_local", "data.train_files={files}/truncated.json.gz",
      "data.validation_files={files}/val.json.gz"],
     "truncated"),
    (T, ["out_dir={files}/new", "data=c4_local", "data.train_files={files}/notjson.json",
      "data.validation_files={files}/val.json.gz"],
     "notjson.json"),
    (T, ["data=c4_local", "data.validation_files={files}/val.json.gz"], "data.train_files is required"),
    (T, ["lr=1e309"], "lr=1e309 is not valid"),
    (T, ["out_dir={files}/killed"], "config.yaml' is not readable YAML (ParserError at line 2)"),
    (T, ["out_dir=" + UNWRITABLE], "is not writable"),
    (T, ["out_dir={files}/new", "data=c4_local", "data.source=parquet", "data.train_files={files}/corpus.csv",
      "data.validation_files={files}/nofield.parquet"], "unknown format"),
    (T, ["out_dir={files}/new", "data=c4_local", "data.source=parquet", "data.train_files={files}/nofield.parquet",
      "data.validation_files={files}/nofield.parquet"], "lack a string field data.text_field='text'"),
    (T, ["out_dir={files}/new", "data=c4_local", "data.train_files={files}/empty.jsonl.zst",
      "data.validation_files={files}/val.json.gz"], "no documents"),
    (T, ["out_dir={files}/new", "data=mix", "data.mix=[{{config:c4_sample,weight:0}}]"], "sum to 0.0"),
    (T, ["out_dir={files}/new", "data=c4_local", "data.train_files={files}/val.json.gz", "data.validation_files=null",
      "data.holdout=5000"], "data.holdout=5000 is larger than the train split (200 documents"),
    # dlr-eval
    ("eval", [], "ckpt is required"),
    ("eval", ["ckpt=/nonexistent/ck"], "/nonexistent/ck"),
    ("eval", ["ckpt={run}"], "no config.json"),
    ("eval", ["ckpt={run}/final", "batch_size=0"], "batch_size=0"),
    ("eval", ["ckpt={run}/final", "eval_tokens=0"], "eval_tokens=0"),
    ("eval", ["ckpt={run}/final", "dtype=fp16"], "dtype='fp16'"),
    ("eval", ["ckpt={run}/final", "device=tpu"], "device='tpu'"),
    ("eval", ["ckpt={run}/final", "+foo=1"], "'foo'"),
    ("eval", ["ckpt={run}/final", "json=maybe"], "json='maybe'"),
    ("eval", ["ckpt={run}/final", "out={run}"], "is a directory"),
    ("eval", ["ckpt={files}/flipped"], "sha256"),
    ("eval", ["ckpt={run}/final", f"out={UNWRITABLE}.json"], f"out='{UNWRITABLE}.json' is not writable"),
    # dlr-fold
    ("fold", ["ckpt={run}/final", "check_batches=0"], "check_batches=0"),
    ("fold", ["ckpt={run}/final", "tolerance=0"], "tolerance=0"),
    ("fold", ["ckpt={run}/final"], "already exists"),
    ("fold", ["ckpt={run}/final", "out={run}/final/x", "overwrite=true"], "overlaps"),
    ("fold", ["ckpt={run}/final", "+tolerence=1"], "did you mean 'tolerance'"),
    ("fold", ["ckpt={run}/final", "dense=maybe"], "dense='maybe'"),
    ("fold", ["ckpt={files}/flipped", "out={files}/f2"], "sha256"),
    ("fold", ["ckpt={run}/final", f"out={UNWRITABLE}"], f"out='{UNWRITABLE}' is not writable"),
    # dlr-compare
    ("compare", ["{run}", "metric=nope"], "'nope'"),
    ("compare", ["{run}", "metricc=val_loss"], "did you mean 'metric'"),
    ("compare", ["{run}", "out={files}/afile"], "afile"),
    ("compare", ["{run}", "--bogus"], "--bogus"),
    ("compare", ["{run}", "out="], "out=''"),
    ("compare", ["{run}", "--out", "x"], "did you mean out=...?"),
    ("compare", ["{run}", "by=no_such_key"], "no_such_key"),
    ("compare", ["{run}", f"out={UNWRITABLE}"], f"out='{UNWRITABLE}' is not writable"),
    ("compare", ["{files}/listed"], "config.yaml' holds a YAML list, not a mapping"),
    # dlr-scaling, dlr-prepare, dlr-finetune
    ("scaling", ["{run}", f"out={UNWRITABLE}"], f"out='{UNWRITABLE}' is not writable"),
    ("scaling", ["{files}/listed"], "config.yaml' holds a YAML list, not a mapping"),
    ("scaling", ["{files}/textloss"], "has val_loss='abc' in summary.json"),
    ("prepare", ["data=c4_sample", f"out={UNWRITABLE}"], f"out='{UNWRITABLE}' is not writable"),
    ("finetune", ["ckpt={run}/final", "data=pairs.jsonl", f"out_dir={UNWRITABLE}"],
     f"out_dir='{UNWRITABLE}' is not writable"),
]


def test_enough_cases():
    assert len(CASES) >= 40
    assert {c[0] for c in CASES} == {"train", "eval", "fold", "compare", "scaling", "prepare", "finetune"}


@pytest.mark.parametrize("command,args,needle", CASES, ids=[f"{c[0]}:{' '.join(c[1])}"[:60] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(run, files, command, args, needle, capfd, monkeypatch):
    before = snapshot(run.parent)
    args = [a.format(run=run, files=files) for a in args]
    if command == "train" and "-m" not in args:
        args = [*TINY, *args] if any(a.startswith("out_dir=") for a in args) else [*TINY, f"out_dir={run}", *args]
    elif command == "train":
        args = ["-m", *TINY, f"out_dir={run}", *[a for a in args if a != "-m"]]
    elif command in ("eval", "fold"):
        args = [*(EVAL if command == "eval" else ["data=c4_sample"]), *args]
    code = invoke(command, args, monkeypatch)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"dlr-{command}: error: "), err[-2000:]
    assert needle.format(files=files) in lines[0], lines[0]
    assert snapshot(run.parent) == before

