"""dlr-finetune end to end on a tiny folded DLR model and prompt/response pairs made from C4.

Checks the loss is on the responses only (recomputed by hand), the factors stay factors (same
tensors, same parameter count), LoRA merges back into them, an interrupted run resumes to the
same weights, and the output loads in plain transformers like every other model directory.
"""
import gzip
import json
import re
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import dlr
from dlr.artifacts.model_dir import load_model_dir, read_config, save_model_dir
from dlr.config import from_overrides
from dlr.cli.finetune import main as finetune_cli
from dlr.data import load_tokenizer
from dlr.finetune import finetune
from test_cli_eval_fold import call
from test_hf_loading import check_tokenizer, run_plain_transformers

BASE = ["steps=4", "batch_size=4", "save_every=2", "log_every=1", "lr=1e-3", "progress=false", "max_length=96"]


def pairs(n: int, skip: int = 0) -> list[dict]:
    path = resources.files("dlr.assets").joinpath("c4_sample", "c4-train.00000-of-00001.json.gz")
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(3 * n + skip), f)][skip:]
    out = []
    for d in docs:
        words = d.split()
        if len(words) >= 45:
            out.append({"prompt": " ".join(words[:30]), "response": " " + " ".join(words[30:45])})
    return out[:n]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method="dlr", seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dlr.fold_model(model)
    return save_model_dir(model, load_tokenizer("t5"), tmp_path_factory.mktemp("sft") / "folded",
                          extra={"step": 7, "tokens": 1234})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "train.jsonl", pairs(24)), write_jsonl(d / "eval.jsonl", pairs(6, skip=100))


@torch.no_grad()
def response_loss(ckpt, records) -> float:
    """Mean NLL of the response tokens (and the EOS after them) given the prompt; prompt tokens excluded."""
    from transformers import AutoTokenizer

    model, _ = load_model_dir(ckpt)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    nll, n = 0.0, 0
    for r in records:
        p = tok(r["prompt"])["input_ids"]
        ids = tok(r["prompt"] + r["response"])["input_ids"] + [tok.eos_token_id]
        assert ids[: len(p)] == p
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        pos = torch.arange(len(p) - 1, len(ids) - 1)
        nll -= float(logp[pos, torch.tensor(ids[len(p):])].sum())
        n += len(ids) - len(p)
    return nll / n


def test_finetune_learns_the_responses_keeps_the_factors_and_loads_anywhere(folded, data, tmp_path, capsys):
    train, held_out = data
    out = tmp_path / "sft"
    code, stdout, err = call(finetune_cli, [f"ckpt={folded}", f"data={train}", f"eval_data={held_out}", f"out_dir={out}",
                                            "batch_size=8", *[a for a in BASE if not a.startswith("batch_size")]],
                                     capsys)
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and json.loads(stdout.strip().splitlines()[-1])["final"] == str(out / "final")
    # The loss TRL optimises is the response-only loss: its eval before training is ours, by hand.
    held = [json.loads(x) for x in open(held_out)]
    assert summary["eval_loss_before"] == pytest.approx(response_loss(folded, held), rel=1e-4)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["eval_loss_after"] == pytest.approx(response_loss(out / "final", held), rel=1e-4)
    # Factors stay factors: the same tensors (names, shapes), the same config, new values.
    before, after = load_file(str(folded / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert summary["params"] == summary["trainable_params"] == sum(v.numel() for v in after.values())
    assert not torch.equal(before["model.layers.0.mlp.up_proj.B.weight"], after["model.layers.0.mlp.up_proj.B.weight"])
    # The same config.json: nothing the trainer toggled for training (use_cache) leaks into it.
    assert json.loads((folded / "config.json").read_text()) == json.loads((out / "final" / "config.json").read_text())
    c0, c1 = read_config(folded), read_config(out / "final")
    assert (c1.dlr_method, c1.dlr_rank, c1.dlr_folded) == (c0.dlr_method, c0.dlr_rank, True)
    extra = json.loads((out / "final" / "dlr_checkpoint.json").read_text())["extra"]
    assert extra["finetuned_from"] == folded.name and (extra["step"], extra["tokens"]) == (7, 1234)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {1, 2, 3, 4} <= set(steps)
    run_plain_transformers([out / "final"], tmp_path, trust_remote_code=True)
    check_tokenizer(load_file(str(tmp_path / "res.safetensors")), 1)


def test_lora_trains_adapters_on_the_factors_and_merges_them_back(folded, data, tmp_path, capsys):
    out = tmp_path / "lora"
    code, _, err = call(finetune_cli, [f"ckpt={folded}", f"data={data[0]}", f"out_dir={out}", "lora=true",
                                       "lora_rank=2", *BASE], capsys)
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["trainable_params"] < summary["params"] // 20
    before, after = load_file(str(folded / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Only the factors of the projections move; embeddings, norms and lm_head are untouched.
    assert changed and all(re.search(r"_proj\.[AB]\.weight$", k) for k in changed)
    assert any(k.endswith(".A.weight") for k in changed) and any(k.endswith(".B.weight") for k in changed)
    model, _ = load_model_dir(out / "final")
    assert sum(p.numel() for p in model.parameters()) == summary["params"]


def test_an_interrupted_run_resumes_to_the_same_weights(folded, data, tmp_path):
    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:  # after checkpoint-2, before checkpoint-4
                raise KeyboardInterrupt

    def cfg(out):
        return from_overrides("finetune", [f"ckpt={folded}", f"train_data={data[0]}", f"out_dir={out}", *BASE])

    finetune(cfg(tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg(tmp_path / "resumed"), callbacks=[Crash()])
    assert not (tmp_path / "resumed" / "final").exists()
    finetune(cfg(tmp_path / "resumed"))  # resume=auto: continues from checkpoint-2
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in load_file(str(folded / "model.safetensors")).items())


@pytest.mark.parametrize("args,needle", [
    (["data=/nonexistent/pairs.jsonl"], r"data='/nonexistent/pairs.jsonl' does not exist"),
    (["prompt_field=question"], r"records lack field\(s\) 'question' \(they have prompt, response\)"),
    (["lr=-1"], r"lr=-1.0 is not valid"),
    (["warmup_ratio=1"], r"warmup_ratio=1.0 is not valid; accepted: .*< 1"),
    (["prompt_field=response"], r"prompt_field and response_field are both 'response'; they must name two fields"),
    (["lora=maybe"], r"lora='maybe' is not valid; accepted: true, false"),
    (["resume=sometimes"], r"resume='sometimes' is not valid; accepted: auto, never"),
    (["out_dir=CKPT/inside"], r"overlaps ckpt="),
    (["ckpt=/nonexistent/model"], r"checkpoint '/nonexistent/model' does not exist"),
    (["stepz=3"], r"unknown setting .stepz.; did you mean .steps."),
    (["data=someone/sft_pairs"], r"data='someone/sft_pairs': cannot load split 'train' from the hub .*give a local .jsonl"),
])
def test_bad_input_is_one_line_and_writes_nothing(folded, data, tmp_path, capsys, args, needle):
    args = [a.replace("CKPT", str(folded)) for a in args]
    base = [f"ckpt={folded}", f"data={data[0]}", f"out_dir={tmp_path / 'o'}", *BASE]
    keys = {a.split("=")[0] for a in args}
    code, _, err = call(finetune_cli, [a for a in base if a.split("=")[0] not in keys] + args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(needle, err), err
    assert not (tmp_path / "o").exists()


def test_changed_or_unrecorded_directories_are_refused_unless_verify_false(folded, data, tmp_path, capsys):
    import shutil

    ckpt = shutil.copytree(folded, tmp_path / "copy")
    with open(ckpt / "lowrank.py", "a") as f:
        f.write("\n# edited\n")
    args = [f"ckpt={ckpt}", f"data={data[0]}", f"out_dir={tmp_path / 'o'}", "steps=1", "save_every=1",
            *[a for a in BASE if a.split("=")[0] not in ("steps", "save_every")]]
    code, _, err = call(finetune_cli, args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lowrank.py' does not match its sha256" in err, err
    (ckpt / "dlr_checkpoint.json").unlink()
    code, _, err = call(finetune_cli, args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has no dlr_checkpoint.json" in err, err
    assert not (tmp_path / "o").exists()
    # A trusted copy: verify=false loads it (the shipped code is never run by dlr's loader anyway).
    code, _, err = call(finetune_cli, [*args, "verify=false"], capsys)
    assert code == 0, err[-2000:]
    assert (tmp_path / "o" / "final" / "dlr_checkpoint.json").is_file()


@pytest.mark.parametrize("content,needle", [
    ("", r"data='.*empty.jsonl' holds no records"),
    ("\n  \n", r"data='.*empty.jsonl' holds no records"),
    ('{"prompt": "a", "response": " b"}\n{not json\n', r"data='.*empty.jsonl' is not JSON lines \(JSON parse error"),
])
def test_empty_or_malformed_data_is_the_only_stderr_line(folded, tmp_path, capsys, content, needle):
    bad = tmp_path / "empty.jsonl"
    bad.write_text(content)
    code, out, err = call(finetune_cli, [f"ckpt={folded}", f"data={bad}", f"out_dir={tmp_path / 'o'}", *BASE], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dlr-finetune: error: ") and re.search(needle, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_an_out_dir_that_is_a_file_is_refused(folded, data, tmp_path, capsys, where):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me\n")
    out = blocker if where == "file" else blocker / "sub"
    code, _, err = call(finetune_cli, [f"ckpt={folded}", f"data={data[0]}", f"out_dir={out}", *BASE], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dlr-finetune: error: ") and f"{str(blocker)!r} is a file, not a directory" in err, err
    assert blocker.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_another_config_in_out_dir_is_refused(folded, data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("ckpt: elsewhere\n")
    code, _, err = call(finetune_cli, [f"ckpt={folded}", f"data={data[0]}", f"out_dir={out}", *BASE], capsys)
    assert code == 2 and "holds a fine-tuning run with a different config" in err
    assert (out / "config.yaml").read_text() == "ckpt: elsewhere\n"


@pytest.mark.parametrize("method", ["full", "lowrank"])
def test_lora_targets_dense_projections_as_modules_and_factors_as_parameters(method):
    from peft import get_peft_model

    from dlr.finetune import lora_config

    model = dlr.build_model("llama_tiny", method=method)
    n = sum(p.numel() for p in model.parameters())
    lc = lora_config(model, from_overrides("finetune", ["ckpt=x", "train_data=y", "lora_rank=2"]))
    if method == "full":
        assert set(lc.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert not lc.target_parameters
    else:
        assert not lc.target_modules
        assert set(lc.target_parameters) == {f"{p}.{f}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj") for f in "AB"}
    peft_model = get_peft_model(model, lc)
    x = torch.randint(0, 32000, (1, 8))
    peft_model(input_ids=x, labels=x).loss.backward()
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == "DlrLlamaForCausalLM" and sum(p.numel() for p in merged.parameters()) == n
