"""The model card (README.md) of a model directory, in the Hugging Face Hub's format.

YAML front matter (library_name, license, datasets, tags, pipeline_tag) and a body that says
what the model is (architecture and factorization knobs), what it was trained on, how well it
does (validation perplexity, the fold check) and how to load and serve it. Built from the
config and the writer's `extra` (dlr_checkpoint.json), so a directory describes itself.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import yaml

from ..config import FactorizationConfig, method_named

LICENSE = "apache-2.0"
PROMPT = "The weather today is"
# The server the tests start (tests/test_vllm.py): vLLM's CPU wheel has no working `vllm` command.
SERVER = "python -m vllm.entrypoints.openai.api_server"


def datasets_of(extra: dict) -> list[str]:
    """The Hub ids of the data the model was trained on (`dataset`, from dlr.data.data_provenance),
    then those it was fine-tuned on."""
    found = [extra["dataset"]] if extra.get("dataset") else []
    tuned = extra.get("finetune", {}).get("dataset") if isinstance(extra.get("finetune"), dict) else None
    return found + [tuned] if tuned and tuned not in found else found


def front_matter(config: Any, extra: dict) -> dict:
    tags = ["dlr", "low-rank", "llama", "text-generation", f"method-{config.dlr_method}"]
    if config.dlr_folded:
        tags.append("folded")
    meta = {"library_name": "transformers", "license": LICENSE, "pipeline_tag": "text-generation", "tags": tags}
    datasets = datasets_of(extra)
    return {**meta, "datasets": datasets} if datasets else meta


def _knobs(config: Any) -> list[tuple[str, Any]]:
    """The size, every factorization setting (config.json's dlr_<setting>), the seed, folded."""
    settings = [(f.name, getattr(config, f"dlr_{f.name}")) for f in dataclasses.fields(FactorizationConfig)]
    return [("size", config.dlr_size or "custom"), *settings, ("seed", config.dlr_seed), ("folded", config.dlr_folded)]


def _ppl(loss: Any) -> str:
    return f"{math.exp(loss):.2f}" if isinstance(loss, (int, float)) and loss < 700 else "n/a"


def _results(extra: dict, fold: dict | None) -> list[str]:
    lines = []
    if "val_loss" in extra:
        where = f" on {extra['val_tokens']:,} held-out tokens" if isinstance(extra.get("val_tokens"), int) else ""
        lines.append(f"- Validation perplexity{where}: **{_ppl(extra['val_loss'])}** (loss {extra['val_loss']:.4f}).")
    if "unfolded_val_loss" in extra:
        lines.append(f"- Fold check: the unfolded model's validation perplexity was {_ppl(extra['unfolded_val_loss'])}; "
                     "the fold is exact, so the two agree.")
    if fold:
        check = fold.get("check", {})
        what = "Dense export check" if fold.get("kind") == "dense" else "Fold check"
        lines.append(f"- {what} (dlr-fold, {check.get('tokens', '?')} validation tokens, fp32): max relative logit "
                     f"difference {check.get('max_rel_diff', 'n/a')} (tolerance {check.get('tolerance', 'n/a')}); "
                     f"parameters equal a plain low-rank model's: {fold.get('params', {}).get('equal', 'n/a')}; "
                     f"passed: {fold.get('passed', 'n/a')}.")
    return lines or ["- No evaluation was recorded with this directory."]


def _served_factors(quantization: dict | None) -> str:
    if quantization:
        return f", with the integer kernels of this directory's {quantization['scheme']} quantization"
    return ""


def _training(extra: dict) -> list[str]:
    hub = f" ([{extra['dataset']}](https://huggingface.co/datasets/{extra['dataset']}))" if extra.get("dataset") else ""
    lines = [f"- Data: `data={extra['data']}`{hub}." if extra.get("data") else "- Data: not recorded."]
    if isinstance(extra.get("tokens"), int):
        lines.append(f"- Tokens trained on: {extra['tokens']:,} ({extra.get('step', '?')} steps).")
    if isinstance(extra.get("data_tokens"), dict) and len(extra["data_tokens"]) > 1:  # a mixture's sources
        per = ", ".join(f"`{k}` {v:,}" for k, v in extra["data_tokens"].items())
        lines.append(f"- Tokens per data source: {per}.")
    tuned = extra.get("finetune")
    if isinstance(tuned, dict):
        lines.append(f"- Fine-tuned (dlr-finetune, {'LoRA merged' if tuned.get('lora') else 'full'}) for "
                     f"{tuned.get('steps', '?')} steps on `{tuned.get('data', '?')}`.")
    for key in ("folded_from", "finetuned_from", "exported_from"):
        if extra.get(key):
            lines.append(f"- {key.replace('_', ' ').capitalize()}: the directory `{extra[key]}`.")
    return lines


def use_section(remote_code: bool, dtype: str = "float32") -> str:
    """How to load, generate with and serve the directory; every snippet runs as written from
    inside the directory (tested), or with MODEL set to its Hub id."""
    load = "import dlr.hf  # registers the dlr_llama classes with transformers: no downloaded code runs\n" \
        if remote_code else ""
    flags = " --model-impl transformers --trust-remote-code" if remote_code else ""
    intro = "With dlr installed, no downloaded code runs:" if remote_code else \
        "A plain LLaMA: transformers and vLLM load it without remote code."
    text = f"""## Use

{intro}

```python
{load}from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

MODEL = "."  # this directory; on the Hub, the repository id
model = AutoModelForCausalLM.from_pretrained(MODEL{", trust_remote_code=False" if remote_code else ""})
tokenizer = AutoTokenizer.from_pretrained(MODEL)
generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
print(generate("{PROMPT}", max_new_tokens=20, do_sample=False)[0]["generated_text"])
```
"""
    if remote_code:
        text += """
Without dlr, transformers runs the three `.py` files of this directory; on the Hub, pin the
commit whose code you reviewed (`revision`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL, REVISION = ".", None  # on the Hub: the repository id and the reviewed commit's sha
model = AutoModelForCausalLM.from_pretrained(MODEL, trust_remote_code=True, revision=REVISION)
tokenizer = AutoTokenizer.from_pretrained(MODEL, trust_remote_code=True, revision=REVISION)
```
"""
    return text + f"""
## Serve

An OpenAI-compatible server with vLLM (the command works with its CPU build too):

```bash
MODEL=.  # this directory; on the Hub, the repository id
{SERVER} --model "$MODEL"{flags} --dtype {dtype}
```
"""


def _quantized(q: dict) -> list[str]:
    check, pb = q["check"], q["projection_bytes"]
    kept = q.get("ignore") or []
    scope = (f"every one but those `ignore` names ({', '.join(f'`{p}`' for p in kept)})" if kept
             else "A and B of every projection" if q["factors"] else "every projection")
    what = f"{q['factors']} factor matrices ({scope}), {q['linears']} linear layers in all" if q["factors"] \
        else f"{q['linears']} linear layers ({scope})"
    return [f"- Quantized ({q['scheme']}, compressed-tensors `{q['format']}`): {what}; the embedding and LM head "
            f"are not. Their tensors: {pb['before']:,} -> {pb['after']:,} bytes.",
            f"- Quantization check on {check['tokens']:,} validation tokens: perplexity {check['ppl_after']:.3f} vs "
            f"{check['ppl_before']:.3f} unquantized (ratio {check['ppl_ratio']:.4f}, bound {check['max_ppl_ratio']}); "
            f"same greedy token at {check['top1_agreement']:.2%} of positions (bound {check['min_agreement']:.0%})."]


def model_card(config: Any, params: int, extra: dict | None = None, fold: dict | None = None,
               quantization: dict | None = None) -> str:
    """README.md text for a directory holding `config` (a DlrLlamaConfig) with `params` parameters;
    `quantization` is a dlr-quantize report."""
    extra = extra or {}
    arch = (f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads, "
            f"FFN {config.intermediate_size}, vocabulary {config.vocab_size}; {params:,} parameters")
    layer = ("dense projections" if not method_named(config.dlr_method).factorized else
             "every projection (q, k, v, o, gate, up, down) factorized, y = c (B + s R) act(A x) + b"
             + (", with the DLR residual folded into B" if config.dlr_folded else ""))
    table = "\n".join(f"| {k} | `{v}` |" for k, v in _knobs(config))
    body = f"""# {config.dlr_size or 'custom'} {config.dlr_method} (rank {config.dlr_rank})

A LLaMA ({arch}) with {layer}, pre-trained with dlr (low-rank LLaMA with Duplicated Latent
Residuals, arXiv 2606.28932). A folded DLR model costs exactly a rank-{config.dlr_rank} model at inference.

## Architecture and factorization

| setting | value |
|---|---|
{table}

## Training

{chr(10).join(_training(extra))}

## Evaluation

{chr(10).join(_results(extra, fold) + (_quantized(quantization) if quantization else []))}

{use_section(remote_code=True, dtype='bfloat16' if quantization else 'float32')}
vLLM's Transformers backend runs attention, RMSNorm and scheduling, and the factors A and B of
every projection as its own linear layers{_served_factors(quantization)}.
"""
    return f"---\n{yaml.safe_dump(front_matter(config, extra), sort_keys=False)}---\n\n{body}"


def dense_card(config: dict, params: int, extra: dict | None = None, fold: dict | None = None,
               quantization: dict | None = None) -> str:
    """README.md text for the dense export (`dlr-fold dense=true`): a plain LLaMA whose `config`
    (config.json, a dict) has no dlr_* fields; `extra` and `fold` say where it came from."""
    extra = extra or {}
    arch = (f"{config.get('num_hidden_layers')} layers, hidden size {config.get('hidden_size')}, "
            f"{config.get('num_attention_heads')} heads, FFN {config.get('intermediate_size')}, "
            f"vocabulary {config.get('vocab_size')}; {params:,} parameters")
    model = (fold or {}).get("model", "dlr model")
    meta = {"library_name": "transformers", "license": LICENSE, "pipeline_tag": "text-generation",
            "tags": ["dlr", "llama", "text-generation", "dense-export"]}
    datasets = datasets_of(extra)
    body = f"""# Dense export of a {model}

A plain LLaMA ({arch}), a `LlamaForCausalLM`: the low-rank model pre-trained with dlr (low-rank
LLaMA with Duplicated Latent Residuals, arXiv 2606.28932) with activation=identity, its
factors multiplied out (W = (B + s R) A), so it computes the same function with dense weights.

## Training

{chr(10).join(_training(extra))}

## Evaluation

{chr(10).join(_results(extra, fold) + (_quantized(quantization) if quantization else []))}

{use_section(remote_code=False, dtype='bfloat16' if quantization else 'float32')}"""
    return f"---\n{yaml.safe_dump({**meta, 'datasets': datasets} if datasets else meta, sort_keys=False)}---\n\n{body}"
