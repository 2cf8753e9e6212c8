"""dlr-eval tasks=...: lm-evaluation-harness over our loaded model, offline, with the bundled task.

The accuracy lm_eval reports is recomputed here by hand (sum of continuation log-probs, argmax
over the choices), so a wrong tokenizer (an EOS appended to every context, shifted ids) or a
wrong model handed to lm_eval fails the test.
"""
import json
import re

import pytest
import torch

from dlr.artifacts.model_dir import load_model_dir
from dlr.cli.evaluate import main as eval_cli
from dlr.eval.harness import bundled_task_dir
from test_cli_eval_fold import call, run  # noqa: F401  (the module-scoped tiny final/ + folded/ fixture)

LIMIT = 8


def task_items(n: int) -> list[dict]:
    lines = (bundled_task_dir() / "c4_cloze" / "c4_cloze.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines[:n]]


@torch.no_grad()
def own_accuracy(ckpt, items) -> float:
    from transformers import AutoTokenizer

    model, _ = load_model_dir(ckpt)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    right = 0
    for it in items:
        ctx = tok(it["context"])["input_ids"]
        scores = []
        for choice in it["choices"]:
            whole = tok(it["context"] + " " + choice)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([whole])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            pos = torch.arange(len(ctx) - 1, len(whole) - 1)
            scores.append(float(logp[pos, torch.tensor(cont)].sum()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == it["label"])
    return right / len(items)


def test_bundled_task_runs_offline_and_matches_a_hand_computed_accuracy(run, tmp_path, capsys):  # noqa: F811
    folded = run / "folded"
    code, out, err = call(eval_cli, [f"ckpt={folded}", "tasks=c4_cloze", f"limit={LIMIT}", "batch_size=4",
                                     "progress=false", f"out={tmp_path / 'e.json'}"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert "val_ppl" not in res  # no data= given: benchmarks only
    m = res["tasks"]["c4_cloze"]
    assert m["samples"] == LIMIT and m["num_fewshot"] == 0
    for key in ("acc", "acc_norm"):
        assert 0 <= m[key] <= 1 and m[f"{key}_stderr"] >= 0
    acc = m["acc"]
    assert m["acc_stderr"] == pytest.approx((acc * (1 - acc) / (LIMIT - 1)) ** 0.5)
    assert acc == pytest.approx(own_accuracy(folded, task_items(LIMIT)))
    assert re.search(r"c4_cloze: acc=\S+±\S+ acc_norm=", out)
    # lm_eval's remarks on how dlr calls it (a loaded model, its --metadata flag) are not dlr's output.
    for noise in ("`pretrained` model kwarg", "already-initialized model", "--metadata"):
        assert noise not in err, err


def test_perplexity_and_tasks_in_one_json(run, tmp_path, capsys):  # noqa: F811
    code, out, err = call(eval_cli, [f"ckpt={run / 'final'}", "tasks=c4_cloze", "limit=2", "data=c4_sample",
                                     "eval_tokens=500", "progress=false", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["protocol"] == "rows" and res["tokens"] > 0 and res["data"]["source"] == "json"
    assert res["tasks"]["c4_cloze"]["samples"] == 2


@pytest.mark.parametrize("args,needle", [
    (["tasks=c4_clozee"], r"unknown lm-evaluation-harness task 'c4_clozee'; did you mean c4_cloze\?"),
    (["tasks=c4_cloze", "limit=0"], r"limit=0 is not valid; accepted: an integer >= 1"),
    (["tasks=c4_cloze", "num_fewshot=-1"], r"num_fewshot=-1 is not valid"),
    (["tasks=c4_cloze", "include_path=/nonexistent/tasks"], r"include_path='/nonexistent/tasks' is not a directory"),
    (["tasks=arc_easy", "limit=2"], r"tasks=arc_easy: the task data could not be read .*hub tasks need the network"),
])
def test_task_errors_are_one_line(run, capsys, args, needle):  # noqa: F811
    code, _, err = call(eval_cli, [f"ckpt={run / 'folded'}", "progress=false", *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(needle, err), err
