"""Tensor parallelism by the plan a model directory declares (DlrLlamaConfig.base_model_tp_plan):
two CPU processes (gloo) through transformers' own TP give the one-process greedy ids, each rank
holding half of every sharded factor; a model with an unfolded residual is refused in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dlr
from dlr.data import load_tokenizer
from dlr.artifacts.model_dir import save_model_dir

SCRIPT = Path(__file__).with_name("serving") / "tp_generate.py"
PROMPTS = [[37, 1530, 12, 8, 2600], [100, 7, 3, 912]]
NEW_TOKENS = 6

pytestmark = pytest.mark.slow


def model_dirs(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", "dlr", bias=True).eval()
    with torch.no_grad():  # peaked logits: the sharded sums round differently, no near-ties may flip
        model.lm_head.weight.mul_(30)
    tokenizer = load_tokenizer("t5")
    save_model_dir(model, tokenizer, root / "final")
    dlr.fold_model(model)
    save_model_dir(model, tokenizer, root / "folded")
    return {"final": root / "final", "folded": root / "folded"}


def two_ranks(path: Path, prefix: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           str(path), json.dumps(PROMPTS), str(NEW_TOKENS), str(prefix)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=prefix.parent)


def one_process(path: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False)[0, len(p):].tolist() for p in PROMPTS]


def test_two_ranks_shard_the_factors_and_give_the_one_process_greedy_ids(tmp_path):
    dirs = model_dirs(tmp_path)
    proc = two_ranks(dirs["folded"], tmp_path / "tp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"tp.{r}.json").read_text()) for r in (0, 1)]
    want = one_process(dirs["folded"])
    assert ranks[0]["ids"] == ranks[1]["ids"] == want
    d, r, ffn = 64, 16, 176  # llama_tiny: hidden, rank, intermediate
    held = ranks[0]["held"]
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):  # B column-parallel, A whole
        assert held[f"{proj}.B.weight"] == {"shape": [d // 2, r], "placement": "S(0)"}
        assert held[f"{proj}.A.weight"]["shape"] == [r, d]
    assert held["mlp.up_proj.B.weight"] == {"shape": [ffn // 2, r], "placement": "S(0)"}
    # Row-parallel A: each rank reads half of the inputs; the all-reduce carries r values per token.
    assert held["self_attn.o_proj.A.weight"] == {"shape": [r, d // 2], "placement": "S(1)"}
    assert held["mlp.down_proj.A.weight"] == {"shape": [r, ffn // 2], "placement": "S(1)"}
    assert held["mlp.down_proj.B.weight"]["shape"] == [d, r]


def test_an_unfolded_residual_is_refused_in_one_line(tmp_path):
    proc = two_ranks(model_dirs(tmp_path)["final"], tmp_path / "tp")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "ValueError: tensor parallelism needs a folded model" in line]
    assert lines and "dlr-fold ckpt=DIR" in lines[0], proc.stderr[-3000:]
