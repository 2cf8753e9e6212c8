"""Quantize a folded (or plain low-rank, or dense) model directory with compressed-tensors.

The output is a compressed-tensors checkpoint, the format vLLM's CPU build serves with int8
kernels and transformers loads through its CompressedTensorsHfQuantizer:

    w8a8   int8 weights (one scale per output channel) and int8 activations (one dynamic
           scale per token): vLLM's CPU int8 scaled-mm kernel.
    w4a16  4-bit weights (per output channel, or per group of `group_size` inputs) packed
           into int32, activations in the model's dtype: vLLM's CPU WNA16 kernel (it needs
           every factor's input and output size to be a multiple of 32).

Every `nn.Linear` but the LM head is quantized: in a low-rank model those are the factors A
and B of every projection, in a dense one (a `full` model, the dense export) its projections.
`ignore` keeps more layers unquantized (module names or `re:` patterns, llm-compressor's
convention), e.g. where a serving kernel does not take a layer's shape; every other layer is
checked to be quantized in the reloaded model. Scales are the weights' own min/max (round to
nearest; no calibration data needed). Written the way llm-compressor writes it (apply the scheme, set the
scales, compress, save, add `quantization_config` to config.json); llm-compressor itself pins
an older transformers, so dlr drives compressed-tensors directly.

`quantize_and_verify` writes the directory, loads it back as dlr-eval does, and compares its
perplexity and top-1 tokens on validation batches with the unquantized model's; nothing is
kept unless both are within the given bounds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from .model_dir import without_progress_bars

if TYPE_CHECKING:
    from ..data.spec import DataSpec

# scheme name -> (compressed-tensors preset, compression format vLLM reads).
SCHEMES = {"w8a8": ("W8A8", "int-quantized"), "w4a16": ("W4A16", "pack-quantized")}
IGNORED = ("lm_head",)  # tied to / as large as the embedding; vLLM keeps it unquantized too


@dataclass(frozen=True)
class QuantCheck:
    """The written directory, loaded back, against the unquantized model on validation batches."""

    batches: int
    tokens: int  # scored tokens
    ppl_before: float
    ppl_after: float
    ppl_ratio: float  # after / before
    top1_agreement: float  # share of positions whose argmax (greedy) token is the same
    max_ppl_ratio: float
    min_agreement: float


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize_and_verify` did; `to_dict()` is the quantize_report.json written beside the weights."""

    input: str
    output: str
    model: str
    scheme: str
    format: str
    group_size: int | None
    ignore: list[str]  # layers kept unquantized besides the LM head (names or re: patterns)
    factors: int  # factor matrices (A and B of every low-rank projection) quantized in the reloaded model
    linears: int  # every quantized nn.Linear (factors, and the dense projections of a full model)
    weight_bytes: dict[str, int]  # all weight files before / after
    projection_bytes: dict[str, int]  # the tensors of the quantized layers before / after
    check: QuantCheck
    passed: bool
    seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quantization_of(path: str | os.PathLike) -> dict | None:
    """The `quantization_config` of a model directory's config.json (None if unquantized)."""
    raw = json.loads((Path(path) / "config.json").read_text())
    q = raw.get("quantization_config") if isinstance(raw, dict) else None
    return q if isinstance(q, dict) else None


def refusal(ckpt: Path) -> str | None:
    """Why the model directory `ckpt` cannot be quantized, or None."""
    from .fold import foldable
    from .model_dir import describe, read_config

    config = read_config(ckpt, dense=True)
    if is_dlr(config) and foldable(config):
        return (f"{str(ckpt)!r} is an unfolded {describe(config)} directory; quantize the folded one "
                f"(dlr-fold ckpt={ckpt} writes it)")
    quantized = quantization_of(ckpt)
    return None if quantized is None else f"{str(ckpt)!r} is already quantized ({quantized.get('format')})"


def is_dlr(config: Any) -> bool:
    """A dlr model directory's config (else the dense export's plain LlamaConfig)."""
    from ..hf import DlrLlamaConfig

    return isinstance(config, DlrLlamaConfig)


def meta_model(config: Any) -> nn.Module:
    """The model of `config` on the meta device: its layers' shapes, no weights."""
    from transformers import LlamaForCausalLM

    from ..model.llama import build_from_config

    if is_dlr(config):
        return build_from_config(config, device="meta")
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def default_out(ckpt: Path, scheme: str) -> Path:
    return ckpt.with_name(f"{ckpt.name}-{scheme}")


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    return ((n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and getattr(m, "quantization_scheme", None) is not None)


def ignored(name: str, ignore: list[str] | tuple[str, ...] = ()) -> bool:
    """Whether the layer `name` stays unquantized: the LM head, and what `ignore` names (the way
    compressed-tensors matches its `ignore` list: a module name, or `re:` and a regex)."""
    return name.rsplit(".", 1)[-1] in IGNORED or any(
        re.match(p[3:], name) if p.startswith("re:") else name == p for p in ignore)


def _scheme(scheme: str, group_size: int | None, ignore: list[str] | tuple[str, ...] = ()):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy, preset_name_to_scheme

    preset = preset_name_to_scheme(SCHEMES[scheme][0], ["Linear"])
    if scheme == "w4a16":  # the preset's group of 128 rarely divides a factor's rank
        strategy = QuantizationStrategy.GROUP if group_size else QuantizationStrategy.CHANNEL
        preset.weights = preset.weights.model_copy(update={"strategy": strategy, "group_size": group_size, "ignore": list(ignore)})
    return QuantizationConfig(config_groups={"group_0": preset}, ignore=[*IGNORED, *ignore])


def _check_groups(model: nn.Module, group_size: int | None, ignore: list[str] | tuple[str, ...] = ()) -> None:
    if not group_size:
        return
    sizes = sorted({m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and not ignored(n, ignore)})
    bad = [s for s in sizes if s % group_size]
    if bad:
        common = math.gcd(*sizes)
        raise ConfigError(f"group_size={group_size} does not divide the input size {bad[0]} of a factor (input sizes: "
                          f"{', '.join(map(str, sizes))}); accepted: a divisor of {common}, or null (per channel)")


@torch.no_grad()
def quantize_model_(model: nn.Module, scheme: str, group_size: int | None = None,
                    ignore: list[str] | tuple[str, ...] = ()) -> int:
    """Attach `scheme` to every nn.Linear but the LM head and set each weight's scales from its
    own min/max (compressed-tensors' qparams); returns how many layers. The model then computes
    with quantized-dequantized weights and activations until `compress_` packs them."""
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r} is not valid; accepted: {', '.join(SCHEMES)}")
    _check_groups(model, group_size, ignore)
    with without_progress_bars():
        apply_quantization_config(model, _scheme(scheme, group_size, ignore))
    count = 0
    for _, m in quantized_linears(model):
        args, w = m.quantization_scheme.weights, m.weight.float()
        rows = w.reshape(w.shape[0], -1, args.group_size) if args.group_size else w.unsqueeze(1)
        scale, zero = calculate_qparams(rows.amin(-1), rows.amax(-1), args)
        m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.copy_(zero.reshape(m.weight_zero_point.shape))
        count += 1
    return count


def compress_(model: nn.Module, scheme: str) -> Any:
    """Replace the weights by their packed integer form; returns the ModelCompressor that writes
    `quantization_config` into the saved config.json."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=SCHEMES[scheme][1])
    with without_progress_bars():
        compressor.compress_model(model)
    return compressor


def factor_count(model: nn.Module, ignore: list[str] | tuple[str, ...] = ()) -> tuple[int, int]:
    """(quantized factors, factors not ignored): A and B of every LowRankLinear."""
    from ..hf.lowrank import LowRankLinear

    factors = [(f"{n}.{k}", getattr(m, k)) for n, m in model.named_modules() if isinstance(m, LowRankLinear)
               for k in ("A", "B")]
    kept = [f for n, f in factors if not ignored(n, ignore)]
    return sum(1 for f in kept if getattr(f, "quantization_scheme", None) is not None), len(kept)


def unquantized_linears(model: nn.Module, ignore: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not ignored(n, ignore)
            and getattr(m, "quantization_scheme", None) is None]


# ------------------------------------------------------------------------- the check


@torch.no_grad()
def score(model: nn.Module, batches: list[dict], device: torch.device) -> tuple[float, int, list[torch.Tensor]]:
    """(summed token loss, scored tokens, argmax ids of each batch): one batch of logits at a time."""
    import torch.nn.functional as F

    loss, tokens, top1 = 0.0, 0, []
    for b in batches:
        logits = model(input_ids=b["input_ids"].to(device)).logits.float()[:, :-1]
        labels = b["labels"][:, 1:].to(device)
        loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                      reduction="sum"))
        tokens += int((labels != -100).sum())
        top1.append(torch.where(labels != -100, logits.argmax(-1), -100).cpu())
    return loss, tokens, top1


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scored = sum(int((x != -100).sum()) for x in a)
    same = sum(int(((x == y) & (x != -100)).sum()) for x, y in zip(a, b))
    return same / max(scored, 1)


def tensor_bytes(path: Path, quantized: set[str] | None = None) -> tuple[int, int]:
    """(bytes of every tensor, bytes of the tensors of the layers in `quantized`) of a directory."""
    from safetensors import safe_open

    total = part = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = math.prod(sl.get_shape()) * _itemsize(sl.get_dtype())
                total += n
                part += n if quantized and k.rsplit(".", 1)[0] in quantized else 0
    return total, part


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[dtype]


# ------------------------------------------------------------------- quantize a directory


class _Rejected(Exception):
    """Raised inside the atomic writer so that a directory failing its check is never kept."""

    def __init__(self, report: QuantizeReport) -> None:
        super().__init__("quantized model outside its bounds")
        self.report = report


def _batches(data: DataSpec | None, tokenizer: Any, eval_tokens: int | None, batch_size: int) -> list[dict]:
    from ..data import validation_batches
    from .fold import bundled_sample

    spec = data if data is not None else bundled_sample()
    if eval_tokens is not None:
        spec = dataclasses.replace(spec, val_tokens=eval_tokens)
    batches = validation_batches(spec, tokenizer, batch_size)
    if not batches:
        raise ConfigError("the data config's validation split is empty; the quantized model cannot be checked (choose data=)")
    return batches


def _check(reloaded: nn.Module, reference: tuple[float, int, list[torch.Tensor]], batches: list[dict],
           device: torch.device, bounds: tuple[float, float]) -> QuantCheck:
    loss0, tokens, top0 = reference
    loss1, _, top1 = score(reloaded, batches, device)
    before, after = math.exp(loss0 / tokens), math.exp(loss1 / tokens)
    return QuantCheck(batches=len(batches), tokens=tokens, ppl_before=before, ppl_after=after, ppl_ratio=after / before,
                      top1_agreement=agreement(top0, top1), max_ppl_ratio=bounds[0], min_agreement=bounds[1])


def quantize_and_verify(ckpt: str | os.PathLike, out: str | os.PathLike | None = None, *, scheme: str = "w8a8",
                        group_size: int | None = None, eval_tokens: int | None = None, batch_size: int = 4,
                        max_ppl_ratio: float = 1.05, min_agreement: float = 0.9, device: str = "cpu",
                        verify: bool = True, overwrite: bool = False, data: DataSpec | None = None,
                        ignore: list[str] | tuple[str, ...] = ()) -> QuantizeReport:
    """Quantize the model directory `ckpt` with `scheme` and write `out` (default <ckpt>-<scheme>).

    The written directory is loaded back the way dlr-eval loads it; its perplexity on the
    validation batches of `data` (default: the bundled C4 sample) must be at most
    `max_ppl_ratio` times the unquantized model's, and its argmax token must agree with the
    unquantized model's at `min_agreement` of the positions, else nothing is written
    (`report.passed` is False). An unfolded DLR directory, an already quantized one and every
    bad setting are ConfigErrors, raised before any weight is read.
    """
    from ..data import check_vocab
    from ..device import pick_device
    from .fold import resolve_out
    from .model_dir import load_model_dir, read_config

    ckpt, dev = Path(ckpt).expanduser(), pick_device(device)
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r} is not valid; accepted: {', '.join(SCHEMES)}")
    if group_size and scheme != "w4a16":
        raise ConfigError(f"group_size={group_size} applies to scheme=w4a16 only; {scheme} has one scale per channel")
    why = refusal(ckpt)
    if why:
        raise ConfigError(why)
    config = read_config(ckpt, dense=True)
    _check_groups(meta_model(config), group_size, ignore)
    target = resolve_out(ckpt, out or default_out(ckpt, scheme), False, overwrite)
    t0 = time.perf_counter()
    model, tokenizer = load_model_dir(ckpt, device=dev, dtype=torch.float32, verify=verify, dense=True)
    check_vocab(tokenizer, model.config.vocab_size)
    batches = _batches(data, tokenizer, eval_tokens, batch_size)
    reference = score(model, batches, dev)
    params = sum(p.numel() for p in model.parameters())
    quantize_model_(model, scheme, group_size, ignore)
    layers = {n for n, _ in quantized_linears(model)}
    compressor = compress_(model, scheme)
    meta = {"input": str(ckpt.resolve()), "output": str(target), "model": describe_quantized(config, scheme),
            "scheme": scheme, "format": SCHEMES[scheme][1], "group_size": group_size, "ignore": list(ignore)}
    try:
        return _write(model, compressor, tokenizer, ckpt, target, meta=meta, layers=layers, params=params,
               check=lambda m: _check(m, reference, batches, dev, (max_ppl_ratio, min_agreement)), t0=t0)
    except _Rejected as e:
        return e.report


def _fold_report(ckpt: Path) -> dict | None:
    """The dense export's fold_report.json (what its card says it came from), if it has one."""
    f = ckpt / "fold_report.json"
    return json.loads(f.read_text()) if f.is_file() else None


def describe_quantized(config: Any, scheme: str) -> str:
    from .model_dir import describe

    return f"{describe(config)} {scheme}"


def _write(model: nn.Module, compressor: Any, tokenizer: Any, ckpt: Path, target: Path, *, meta: dict, layers: set[str],
           params: int, check: Any, t0: float) -> QuantizeReport:
    """Save, load back, check; keep the directory only if the check passes (else _Rejected)."""
    from ..atomic import atomic_dir
    from .model_dir import finish_model_dir, load_model_dir, read_meta, save_pretrained_quietly, write_errors

    with write_errors(target), atomic_dir(target) as tmp:
        save_pretrained_quietly(model, tmp)
        compressor.update_config(tmp)
        tokenizer.save(tmp)
        reloaded, _ = load_model_dir(tmp, device=next(model.parameters()).device, verify=False, dense=True)
        factors, all_factors = factor_count(reloaded, meta["ignore"])
        missed = unquantized_linears(reloaded, meta["ignore"])
        if factors != all_factors or missed:  # quantize_model_ targets every nn.Linear: a bug, not bad input
            raise RuntimeError(f"layers left unquantized: {missed[:3]} ({factors} of {all_factors} factors quantized)")
        result = check(reloaded)
        before, after = tensor_bytes(ckpt, layers), tensor_bytes(tmp, layers)
        report = QuantizeReport(**meta, factors=factors, linears=len(layers),
                                weight_bytes={"before": before[0], "after": after[0]},
                                projection_bytes={"before": before[1], "after": after[1]}, check=result,
                                passed=result.ppl_ratio <= result.max_ppl_ratio
                                and result.top1_agreement >= result.min_agreement,
                                seconds=round(time.perf_counter() - t0, 3))
        if not report.passed:
            raise _Rejected(report)
        from .model_card import dense_card, model_card
        from .model_dir import read_config

        extra = {**read_meta(ckpt).get("extra", {}), "quantized_from": ckpt.resolve().name}  # a name: no path of this machine
        config = read_config(tmp, dense=True)
        card = (model_card(config, params, extra, quantization=report.to_dict()) if is_dlr(config) else
                dense_card(config.to_dict(), params, extra, _fold_report(ckpt), quantization=report.to_dict()))
        # The file names directories, never locates them (the returned report keeps the paths).
        named = {**report.to_dict(), "input": Path(report.input).name, "output": Path(report.output).name}
        finish_model_dir(tmp, extra, tokenizer=tokenizer, files={"quantize_report.json": named, "README.md": card})
    return report
