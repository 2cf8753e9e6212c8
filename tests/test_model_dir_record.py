"""Every byte a loader reads is verified, and what a model directory tells the Hub is right.

A catalogue of tampered directories (one case per tampering) is refused by load_model_dir and
by dlr-eval, dlr-fold and dlr-finetune in one line naming the file. A real tiny run's final/,
folded/, dense export and fine-tuned output each carry the card and the full record, name the
data they were trained on, hold no path of this machine, and their cards' snippets run.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import dlr
from dlr.cli.evaluate import main as eval_cli
from dlr.cli.finetune import main as finetune_cli
from dlr.cli.fold import main as fold_cli
from dlr.config import from_overrides
from dlr.errors import ConfigError
from dlr.artifacts.model_card import PROMPT, SERVER
from dlr.artifacts.model_dir import META_FILE, check_integrity, load_model_dir, read_meta, recorded_names, save_model_dir
from dlr.train.loop import train
from test_cli_eval_fold import call
from test_finetune import pairs, write_jsonl


@pytest.fixture(scope="module")
def made(tmp_path_factory, tok):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("record")
    d = save_model_dir(dlr.build_model("llama_tiny", "dlr", rank=8), tok, root / "final", extra={"step": 1})
    data = write_jsonl(root / "pairs.jsonl", pairs(4))
    return d, data


def _edit_json(f: Path, **changes) -> None:
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}, indent=2))


def _unrecorded_shard(d: Path) -> None:
    """The recorded model.safetensors stays intact; an index points the loader at another shard."""
    state = load_file(str(d / "model.safetensors"))
    other = {k: v * 2 if v.is_floating_point() else v for k, v in state.items()}
    save_file(other, str(d / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in other}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _flip_without_hash(d: Path) -> None:
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0x01
    w.write_bytes(bytes(data))
    meta = read_meta(d)
    del meta["files"]["model.safetensors"]["sha256"]
    (d / META_FILE).write_text(json.dumps(meta))


def _drop_record(d: Path) -> None:
    meta = read_meta(d)
    del meta["files"]
    (d / META_FILE).write_text(json.dumps(meta))


# name: (tampering, the file the one-line refusal names, what it says)
TAMPER = {
    "config.json: dlr_alpha edited": (lambda d: _edit_json(d / "config.json", dlr_alpha=3.0),
                                      "config.json", "does not match its sha256"),
    "config.json: auto_map to another repository": (
        lambda d: _edit_json(d / "config.json", auto_map={"AutoModelForCausalLM": "evil/repo--modeling.Model"}),
        "config.json", "does not match its sha256"),
    "an index and an unrecorded shard": (_unrecorded_shard, "model-00001-of-00001.safetensors", "is not listed"),
    "the record removed": (_drop_record, META_FILE, "has no record of the directory's files"),
    "a flipped bit, its sha256 removed": (_flip_without_hash, "model.safetensors", "has no sha256"),
    "generation_config.json edited": (lambda d: _edit_json(d / "generation_config.json", eos_token_id=5),
                                      "generation_config.json", "does not match its sha256"),
    "tokenizer.json edited": (lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text() + " "),
                              "tokenizer.json", "does not match its sha256"),
    "a tokenizer file added": (lambda d: (d / "special_tokens_map.json").write_text('{"eos_token": "<pad>"}'),
                               "special_tokens_map.json", "is not listed"),
    "a recorded file removed": (lambda d: (d / "tokenizer_config.json").unlink(), "tokenizer_config.json", "is missing"),
}


def tampered(made, tmp_path: Path, case: str) -> tuple[Path, str, str]:
    d = tmp_path / "ck"
    shutil.copytree(made[0], d)
    damage, name, says = TAMPER[case]
    damage(d)
    return d, name, says


@pytest.mark.parametrize("case", list(TAMPER))
def test_a_tampered_directory_is_refused_in_one_line_naming_the_file(made, tmp_path, case):
    d, name, says = tampered(made, tmp_path, case)
    with pytest.raises(ConfigError) as e:
        load_model_dir(d)
    msg = str(e.value)
    assert f"{d / name}'" in msg and says in msg and "\n" not in msg, msg
    if case != "a recorded file removed":  # verify=false trusts the copy (sizes of weights still checked)
        check_integrity(d, verify=False)


@pytest.mark.parametrize("case", list(TAMPER))
def test_dlr_eval_fold_and_finetune_refuse_it_with_exit_2(made, tmp_path, case, capsys):
    d, name, says = tampered(made, tmp_path, case)
    runs = [(eval_cli, [f"ckpt={d}", "data=c4_sample", "eval_tokens=500", "progress=false"]),
            (fold_cli, [f"ckpt={d}", f"out={tmp_path / 'folded'}"]),
            (finetune_cli, [f"ckpt={d}", f"data={made[1]}", f"out_dir={tmp_path / 'sft'}", "steps=1", "progress=false"])]
    for cli, args in runs:
        code, _, err = call(cli, args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
        assert f"{d / name}'" in err and says in err, err
    assert not (tmp_path / "folded").exists() and not (tmp_path / "sft" / "final").exists()


# ----------------------------------------------------------------- a real run's directories


@pytest.fixture(scope="module")
def run(tmp_path_factory, made):
    """final/ and folded/ of a real tiny dlr-train run (identity activation, so it exports dense),
    its dense export (dlr-fold dense=true) and a dlr-finetune of folded/."""
    root = tmp_path_factory.mktemp("run")
    out = root / "run"
    train(from_overrides("train", ["model=llama_tiny", "data=c4_sample", "method=dlr", "activation=identity",
                                   "steps=2", "global_batch=4", "micro_batch=4", "data.val_tokens=1000",
                                   "data.num_workers=0", "eval_every=2", "save_every=2", f"out_dir={out}"]))
    for cli, args in ((fold_cli, [f"ckpt={out / 'final'}", "dense=true"]),
                      (finetune_cli, [f"ckpt={out / 'folded'}", f"data={made[1]}", f"out_dir={root / 'sft'}",
                                      "steps=1", "batch_size=2", "max_length=64", "progress=false"])):
        with pytest.raises(SystemExit) as e:
            cli([str(a) for a in args])
        assert e.value.code == 0
    return {"final": out / "final", "folded": out / "folded", "dense": out / "final-dense",
            "finetuned": root / "sft" / "final"}


KINDS = ["final", "folded", "dense", "finetuned"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_directory_has_the_card_and_the_full_record(run, kind):
    d = run[kind]
    assert (d / "README.md").is_file()
    record = read_meta(d)["files"]
    assert sorted(record) == recorded_names(d) and "config.json" in record and "tokenizer.json" in record
    check_integrity(d, verify=True)


@pytest.mark.parametrize("kind", KINDS)
def test_no_file_holds_a_path_of_the_machine_that_wrote_it(run, kind):
    d = run[kind]
    paths = {str(d.parents[1]), os.path.realpath(d.parents[1]), os.path.expanduser("~"),
             str(Path(dlr.__file__).resolve().parents[1]), str(Path.cwd())}
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        data = f.read_bytes()
        for path in paths:
            assert path.encode() not in data, (f.name, path)


@pytest.mark.parametrize("kind", KINDS)
def test_the_card_names_the_data_the_run_trained_on(run, kind):
    text = (run[kind] / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["datasets"][0] == "allenai/c4"
    assert "`data=c4_sample`" in text and "not recorded" not in text
    assert read_meta(run[kind])["extra"]["data"] == "c4_sample"


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("kind", ["final", "dense"])
def test_the_card_snippets_run_as_written_from_the_directory(run, kind, tmp_path):
    """Offline, from inside the directory (MODEL = "."): with dlr.hf, without dlr (the shipped code)."""
    d = run[kind]
    snippets = blocks((d / "README.md").read_text(), "python")
    assert len(snippets) == (2 if kind == "final" else 1)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    outputs = []
    for code in snippets:
        proc = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    assert outputs[0].startswith(PROMPT) and len(outputs[0].strip()) > len(PROMPT), outputs[0]


@pytest.mark.parametrize("kind", KINDS)
def test_the_card_serves_with_the_tested_vllm_server_command(run, kind):
    (block,) = blocks((run[kind] / "README.md").read_text(), "bash")
    assign, command = block.strip().splitlines()
    assert assign.startswith("MODEL=. ")
    argv = shlex.split(command)
    assert argv[:5] == [*SERVER.split(), "--model", "$MODEL"]
    remote = ["--model-impl", "transformers", "--trust-remote-code"]
    assert argv[5:] == ([] if kind == "dense" else remote) + ["--dtype", "float32"]


@pytest.mark.parametrize("kind", ["dense", "folded", "finetuned"])
def test_dlr_eval_reads_every_directory(run, kind, capsys):
    args = [f"ckpt={run[kind]}", "data=c4_sample", "eval_tokens=600", "batch_size=4", "progress=false", "--json"]
    code, out, err = call(eval_cli, args, capsys)
    assert code == 0, err[-2000:]
    got = json.loads(out)
    if kind != "finetuned":  # the fold and the dense export compute the unfolded model's function
        code, ref, _ = call(eval_cli, [f"ckpt={run['final']}", *args[1:]], capsys)
        assert abs(got["val_loss"] - json.loads(ref)["val_loss"]) < 1e-4


@pytest.mark.parametrize("overrides,want", [
    (["data=c4"], {"data": "c4", "dataset": "allenai/c4"}),
    (["data=c4_sample", "data.seq_len=64"], {"data": "c4_sample", "dataset": "allenai/c4"}),
    (["data=c4_local", "data.train_files=/data/c4/t.json.gz", "data.validation_files=/data/c4/v.json.gz"],
     {"data": "c4_local", "dataset": "allenai/c4"}),
    (["data=text", "data.validation_files=/home/me/corpus.txt"], {"data": "text"}),
    (["data=c4", "data.path=someone/corpus"], {"data": "custom hub data", "dataset": "someone/corpus"}),
])
def test_data_provenance_names_the_setting_and_its_hub_id_never_a_path(overrides, want):
    from dlr.data import data_provenance

    assert data_provenance(from_overrides("train", ["model=llama_tiny", *overrides]).data) == want
