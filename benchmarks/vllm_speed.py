"""Time one model directory served by vLLM; run by bench_inference with the vLLM venv's Python.

vLLM pins its own transformers, so this runs where dlr is not installed: vLLM builds a dlr
model from the directory's own code through its Transformers backend, and a plain LLaMA (the
dense export) with its own LLaMA implementation. Nothing here computes a rate:
it prints the raw seconds of each timed `generate`, and bench_inference turns them into
tokens/s exactly as it does for HF `generate`.

argv: the model directory, then a JSON object {"prompts": {batch: [[ids], ...]}, "new": int,
"repeats": int, "dtype": "float32" | "bfloat16", "device": "cpu" | "cuda"}. Prints one JSON line:
{"vllm": version, "projections": [class names], "params": int,
 "seconds": {batch: [[first, full], ...]}} where `first` is `generate` of one token (the
prefill) and `full` of `new` tokens, a warm-up pair first.
"""
import json
import sys
import time

import vllm
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def served(model) -> dict:
    """What vLLM actually runs: the projections' classes (factor layers, not a dense weight) and parameters."""
    names = {type(m).__name__ for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))}
    return {"projections": sorted(names), "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    path, spec = sys.argv[1], json.loads(sys.argv[2])
    prompts = {int(b): [TokensPrompt(prompt_token_ids=ids) for ids in rows] for b, rows in spec["prompts"].items()}
    prompt_len = len(next(iter(prompts.values()))[0]["prompt_token_ids"])
    with open(f"{path}/config.json") as f:
        dlr_dir = json.load(f).get("model_type") == "dlr_llama"
    # A dlr directory runs through the Transformers backend (its factor layers become vLLM's linear
    # layers); a plain LLaMA (the dense export) through vLLM's own LLaMA, as vLLM serves dense models.
    llm = LLM(model=path, model_impl="transformers" if dlr_dir else "auto", trust_remote_code=dlr_dir,
              dtype=spec["dtype"], max_model_len=prompt_len + spec["new"], max_num_seqs=max(prompts), seed=0,
              # Every repeat sends the same prompts: with prefix caching on, all but the first would
              # skip their prefill and the timing would measure the cache, not the model.
              enable_prefix_caching=False,
              # CPU: the share of host memory vLLM reserves stays small (VLLM_CPU_KVCACHE_SPACE sizes
              # the KV cache). Otherwise vLLM's defaults (its torch.compile of the model included),
              # unless --vllm-eager asks for the model as written.
              **({"gpu_memory_utilization": 0.1} if spec["device"] == "cpu" else {}),
              **({"enforce_eager": True} if spec.get("eager") else {}))

    def timed(batch: int, n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts[batch], params, use_tqdm=False)
        return time.perf_counter() - start

    seconds = {b: [[timed(b, 1), timed(b, spec["new"])] for _ in range(spec["repeats"] + 1)] for b in prompts}
    print(json.dumps({"vllm": vllm.__version__, **llm.apply_model(served)[0], "seconds": seconds}))


if __name__ == "__main__":
    main()
