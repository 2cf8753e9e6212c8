"""Run by tests/test_tensor_parallel.py under torch.distributed.run (gloo, CPU): transformers' own
tensor parallelism (from_pretrained(tp_plan="auto")) with the plan the model directory's config
declares, through the directory's shipped code.

argv: model directory, JSON list of prompts (lists of token ids), max new tokens, output prefix.
Writes <prefix>.<rank>.json: the greedy ids and the local shape and placement of layer 0's factors.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM


def held(model) -> dict:
    out = {}
    for name, p in model.model.layers[0].named_parameters():
        if name.endswith((".A.weight", ".B.weight")):
            local = p.to_local() if hasattr(p, "to_local") else p
            out[name] = {"shape": list(local.shape), "placement": str(getattr(p, "placements", ["Replicate()"])[0])}
    return out


def main() -> None:
    model_dir, prompts, new, prefix = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    ids = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            ids.append(out[0, len(p):].tolist())
    with open(f"{prefix}.{os.environ['RANK']}.json", "w") as f:
        json.dump({"ids": ids, "held": held(model)}, f)


if __name__ == "__main__":
    main()
