"""Run by tests/test_vllm.py with the vLLM venv's Python (vLLM pins its own transformers), where
dlr is not installed: vLLM builds the model from the directory's own code.

argv: model directory, JSON list of prompts (lists of token ids), max new tokens, optionally the
dtype (float32). Prints one JSON line: the greedy token ids for each prompt, the classes of the
projections vLLM runs, and for their factors A and B: the layer class and its quantization scheme.
"""
import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def projection_classes(model) -> list[str]:
    return sorted({type(m).__name__ for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))})


def factor_layers(model) -> list[str]:
    """'<layer class>/<scheme class>' of every factor (None: unquantized)."""
    return sorted({f"{type(m).__name__}/{type(getattr(m, 'scheme', None)).__name__}"
                   for name, m in model.named_modules() if name.endswith(("_proj.A", "_proj.B"))})


def main() -> None:
    model_dir, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    # On the CPU backend gpu_memory_utilization is the share of host memory vLLM reserves.
    dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
    llm = LLM(model=model_dir, model_impl="transformers", trust_remote_code=True, dtype=dtype,
              max_model_len=128, enforce_eager=True, seed=0, gpu_memory_utilization=0.1)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    classes, factors = llm.apply_model(projection_classes)[0], llm.apply_model(factor_layers)[0]
    print(json.dumps({"ids": [list(o.outputs[0].token_ids) for o in outputs], "projections": classes,
                      "factors": factors}))


if __name__ == "__main__":
    main()
