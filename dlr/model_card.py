"""The model card (README.md) of a model directory, in the Hugging Face Hub's format.

YAML front matter (library_name, license, datasets, tags, pipeline_tag) and a body that says
what the model is (architecture and factorization knobs), what it was trained on, how well it
does (validation perplexity, the fold check) and how to load and serve it. Built from the
config and the writer's `extra` (dlr_checkpoint.json), so a directory describes itself.
"""
from __future__ import annotations

import math
from typing import Any

import yaml

# Data configs that read C4 (allenai/c4), as the Hub names the dataset.
C4_DATA = ("c4", "c4_sample", "c4_local")
LICENSE = "apache-2.0"


def front_matter(config: Any, extra: dict) -> dict:
    data = extra.get("data")
    datasets = ["allenai/c4"] if data in C4_DATA else [extra["dataset"]] if extra.get("dataset") else []
    tags = ["dlr", "low-rank", "llama", "text-generation", f"method-{config.dlr_method}"]
    if config.dlr_folded:
        tags.append("folded")
    meta = {"library_name": "transformers", "license": LICENSE, "pipeline_tag": "text-generation", "tags": tags}
    return {**meta, "datasets": datasets} if datasets else meta


def _knobs(config: Any) -> list[tuple[str, Any]]:
    return [("size", config.dlr_size or "custom"), ("method", config.dlr_method), ("rank", config.dlr_rank),
            ("activation", config.dlr_activation), ("alpha", config.dlr_alpha), ("expand", config.dlr_expand),
            ("scope", config.dlr_scope), ("seed", config.dlr_seed), ("variance_correction", config.dlr_variance_correction),
            ("trainable_alpha", config.dlr_trainable_alpha), ("latent_alpha", config.dlr_latent_alpha),
            ("trainable_latent_scale", config.dlr_trainable_latent_scale), ("bias", config.dlr_bias),
            ("folded", config.dlr_folded)]


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
        lines.append(f"- Fold check (dlr-fold, {check.get('tokens', '?')} validation tokens, fp32): max relative logit "
                     f"difference {check.get('max_rel_diff', 'n/a')} (tolerance {check.get('tolerance', 'n/a')}); "
                     f"parameters equal a plain low-rank model's: {fold.get('params', {}).get('equal', 'n/a')}; "
                     f"passed: {fold.get('passed', 'n/a')}.")
    return lines or ["- No evaluation was recorded with this directory."]


def _served_factors(quantization: dict | None) -> str:
    if quantization:
        return f", with the integer kernels of this directory's {quantization['scheme']} quantization"
    return ""


def _training(extra: dict) -> list[str]:
    lines = [f"- Data: `{extra['data']}`." if extra.get("data") else "- Data: not recorded."]
    if isinstance(extra.get("tokens"), int):
        lines.append(f"- Tokens trained on: {extra['tokens']:,} ({extra.get('step', '?')} steps).")
    for key in ("folded_from", "finetuned_from"):
        if extra.get(key):
            lines.append(f"- {key.replace('_', ' ').capitalize()}: a directory named `{str(extra[key]).rsplit('/', 1)[-1]}`.")
    return lines


def _quantized(q: dict) -> list[str]:
    check, pb = q["check"], q["projection_bytes"]
    return [f"- Quantized ({q['scheme']}, compressed-tensors `{q['format']}`): {q['factors']} factor matrices "
            f"(A and B of every projection), {q['linears']} linear layers in all; the embedding and LM head are not. "
            f"Their tensors: {pb['before']:,} -> {pb['after']:,} bytes.",
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
    layer = ("dense projections" if config.dlr_method == "full" else
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

## Use

With dlr installed, no downloaded code runs:

```python
import dlr  # registers the dlr_llama classes with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(MODEL, trust_remote_code=False)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
```

Without dlr, transformers runs the three `.py` files of this directory; pin the revision you reviewed:

```python
model = AutoModelForCausalLM.from_pretrained(MODEL, trust_remote_code=True, revision=COMMIT_SHA)
```

## Serve

```bash
vllm serve MODEL --model-impl transformers --trust-remote-code
```

vLLM's Transformers backend runs attention, RMSNorm and scheduling, and the factors A and B of
every projection as its own linear layers{_served_factors(quantization)}.
"""
    return f"---\n{yaml.safe_dump(front_matter(config, extra), sort_keys=False)}---\n\n{body}"
