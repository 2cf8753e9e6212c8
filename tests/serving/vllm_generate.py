"""Run by tests/test_vllm.py with the vLLM venv's Python (vLLM pins its own transformers), where
dlr is not installed: vLLM builds the model from the directory's own code.

argv: model directory, JSON list of prompts (lists of token ids), max new tokens, and optionally
the tensor-parallel size and the dtype (float32). Prints one JSON line: the greedy token ids for each
prompt and, in one process (tp 1), the classes of the projections vLLM runs, of their factors A and
B, and the factors' quantization schemes.
"""
import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def projection_classes(model) -> list[str]:
    return sorted({type(m).__name__ for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))})


def factor_classes(model) -> dict:
    """{"A": classes, "B": classes, "count": factors, "linear_base": every factor is a vLLM linear layer}."""
    from vllm.model_executor.layers.linear import LinearBase

    factors = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules() if name.endswith(("_proj.A", "_proj.B"))]
    return {"A": sorted({type(m).__name__ for k, m in factors if k == "A"}),
            "B": sorted({type(m).__name__ for k, m in factors if k == "B"}),
            "count": len(factors), "linear_base": bool(factors) and all(isinstance(m, LinearBase) for _, m in factors)}


def factor_schemes(model) -> list[str]:
    """The class of every factor's quantization scheme ('NoneType': unquantized)."""
    return sorted({type(getattr(m, "scheme", None)).__name__ for name, m in model.named_modules()
                   if name.endswith(("_proj.A", "_proj.B"))})


def main() -> None:
    model_dir, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    tp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    # On the CPU backend gpu_memory_utilization is the share of host memory vLLM reserves.
    dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
    llm = LLM(model=model_dir, model_impl="transformers", trust_remote_code=True, dtype=dtype,
              max_model_len=128, enforce_eager=True, seed=0, gpu_memory_utilization=0.1, tensor_parallel_size=tp)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    result = {"ids": [list(o.outputs[0].token_ids) for o in outputs]}
    if tp == 1:  # the engine in this process: the functions reach the model without pickling
        result |= {"projections": llm.apply_model(projection_classes)[0], "factors": llm.apply_model(factor_classes),
                   "schemes": llm.apply_model(factor_schemes)[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
