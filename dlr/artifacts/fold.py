"""Fold the DLR residual (and a latent scale) into B: B* = c (B + s R), exact and idempotent.

`fold_model` folds a model in place; `fold_and_verify` folds a model directory, checks the
result against the unfolded model and the plain lowrank model of the same size, and writes
a new model directory (what dlr-fold runs).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..atomic import check_writable
from ..config import FULL, FactorizationConfig, method_named
from ..errors import ConfigError
from ..hf.lowrank import LowRankLinear
from ..model.llama import deploy_config, factorization_of

if TYPE_CHECKING:
    from ..data.spec import DataSpec


@torch.no_grad()
def _fold_shard_(layer: LowRankLinear) -> bool:
    """`layer.fold_()` on this process's rows of an FSDP2-sharded B: no gather, no copy.

    c (B + s R) is row-local (R is one-hot per output row), so the layer's own fold runs on a
    view of its rows: B is swapped for the local shard (which it then writes in place) and the
    index for those rows' entries. Same ops as unsharded, so the result is bit-identical.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded_B, out_features = layer.B.weight, layer.out_features
    shape, offset = compute_local_shape_and_global_offset(sharded_B.shape, sharded_B.device_mesh, sharded_B.placements)
    rows = slice(offset[0], offset[0] + shape[0])
    layer.B._parameters["weight"] = nn.Parameter(sharded_B.to_local(), requires_grad=False)
    if layer.dlr_index is not None:
        layer._buffers["dlr_index"] = layer.dlr_index[rows]
    layer.out_features, layer._dlr_cache = shape[0], None
    try:
        return layer.fold_()
    finally:
        layer.B._parameters["weight"], layer.out_features = sharded_B, out_features


def fold_model(model: nn.Module) -> int:
    """Fold every DLR layer in place (with the learned alpha and latent scale, if trainable);
    returns how many layers were folded (0 if none are left). On an FSDP2-sharded model each
    process folds the rows of B it holds."""
    from torch.distributed.tensor import DTensor

    folded = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            folded += _fold_shard_(m) if isinstance(m.B.weight, DTensor) else m.fold_()
    config = getattr(model, "config", None)
    method = method_named(config.dlr_method) if hasattr(config, "dlr_method") else None
    if method is not None and method.fold is not None and not config.dlr_folded:
        folded += method.fold(model)
    if method is not None and (method.folds(factorization_of(config)) or folded):
        # Recorded so that a reload builds the layout of method.deploys_as (no residual, no latent scale).
        config.dlr_folded = True
    return folded


# --------------------------------------------------------------------- fold a model directory


@dataclass(frozen=True)
class LogitsCheck:
    """The folded model's logits against the unfolded one's on a few real batches (fp32)."""

    batches: int
    batch_size: int
    seq_len: int
    tokens: int  # label tokens in the check batches
    dtype: str
    device: str
    max_abs_diff: float
    max_rel_diff: float  # max |diff| / max |logits|: scale-free, unlike an elementwise relative diff
    tolerance: float


@dataclass(frozen=True)
class Agreement:
    """A count before and after the fold, and in the reference model built from scratch."""

    before: int
    after: int
    reference: int
    equal: bool  # after == reference


@dataclass(frozen=True)
class FoldReport:
    """What `fold_and_verify` did; `to_dict()` is the fold_report.json written beside the weights."""

    input: str
    output: str
    kind: str  # "fold" (a lowrank model directory) or "dense" (a plain LlamaForCausalLM)
    model: str
    dlr: dict[str, Any]  # the input's dlr_* knobs
    layers_folded: int
    check: LogitsCheck
    reference: str  # which model the folded one must match in size
    params: Agreement  # total parameters
    forward_flops_per_token: Agreement
    passed: bool  # logits within tolerance and both counts equal; nothing is written otherwise
    seconds: dict[str, float | None]  # load_and_data, total (None until written)
    peak_rss_mb: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The config.json fields a fold report records: the size, every factorization setting, the seed.
KNOBS = ("dlr_size", *(f"dlr_{f.name}" for f in dataclasses.fields(FactorizationConfig)), "dlr_seed")


def default_out(ckpt: Path, dense: bool) -> Path:
    if dense:
        return ckpt.with_name(f"{ckpt.name}-dense")
    # The trainer writes <run>/final and <run>/folded; keep that pairing.
    return ckpt.with_name("folded") if ckpt.name == "final" else ckpt.with_name(f"{ckpt.name}-folded")


def resolve_out(ckpt: Path, out: str | os.PathLike | None, dense: bool, overwrite: bool) -> Path:
    target = (Path(out).expanduser() if out else default_out(ckpt, dense)).resolve()
    src = ckpt.resolve()
    if target == src or src in target.parents or target in src.parents:
        # Writing replaces the target directory: any overlap would destroy the input.
        raise ConfigError(f"out={str(target)!r} overlaps the input checkpoint {str(src)!r}; choose a separate directory")
    if target.exists() and not overwrite:
        raise ConfigError(f"out={str(target)!r} already exists; pass overwrite=true or choose another out=")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"out={str(target)!r} exists and is not a directory")
    check_writable(target, "out")
    return target


def foldable(config: Any) -> bool:
    """Something not folded yet (a DLR residual, a latent scale, a registered method's layers):
    what the trainer asks too before it writes folded/ (`Method.folds`)."""
    return not config.dlr_folded and method_named(config.dlr_method).folds(factorization_of(config))


def nothing_to_fold(ckpt: str | os.PathLike) -> str | None:
    """Why the model directory `ckpt` has nothing to fold, or None if it has."""
    from .model_dir import describe, read_config

    config = read_config(Path(ckpt).expanduser())
    if foldable(config):
        return None
    why = "already folded" if config.dlr_folded else \
        f"a {config.dlr_method} checkpoint with nothing to fold (no DLR residual, no latent scale)"
    return f"{str(Path(ckpt).expanduser())!r} is {why} ({describe(config)})"


def bundled_sample() -> DataSpec:
    """The C4 sample shipped with dlr (configs/data/c4_sample.yaml): a check needs no network."""
    from importlib import resources

    import yaml

    from dlr.data import data_spec

    return data_spec(yaml.safe_load(resources.files("dlr.configs").joinpath("data", "c4_sample.yaml").read_text()))


def check_batches_of(data: DataSpec, tokenizer: Any, n: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    from dlr.data import validation_batches

    # Only the first few batches are used, so only tokenize about that much.
    spec = dataclasses.replace(data, val_tokens=n * batch_size * data.seq_len)
    batches = validation_batches(spec, tokenizer, batch_size)[:n]
    if not batches:
        raise ConfigError("the data config's validation split is empty; the fold cannot be verified (choose data=)")
    return batches


@torch.no_grad()
def logits_of(model: nn.Module, batches: list[dict], device: torch.device) -> list[torch.Tensor]:
    return [model(input_ids=b["input_ids"].to(device)).logits.float().cpu() for b in batches]


def compare(ref: list[torch.Tensor], new: list[torch.Tensor]) -> tuple[float, float]:
    """(max |diff|, max |diff| / max |ref|): a scale-free number, unlike elementwise rel. diff."""
    max_abs = max(float((a - b).abs().max()) for a, b in zip(ref, new))
    scale = max(float(a.abs().max()) for a in ref)
    return max_abs, max_abs / scale if scale > 0 else max_abs


def peak_rss_mb() -> float:
    import resource

    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reference(config: Any, dense: bool) -> tuple[Any, str]:
    """The config of the model the result must match in size, and its name in the report."""
    if dense:
        # Same LLaMA, method=full: the dense model's own reference layout.
        ref = copy.deepcopy(config)
        ref.dlr_method, ref.dlr_rank, ref.dlr_folded = FULL.name, None, False
        return ref, "full (dense) model of the same size"
    ref = deploy_config(config)
    rank = f" and rank {ref.dlr_rank}" if method_named(ref.dlr_method).factorized else ""
    return ref, f"plain {ref.dlr_method} model of the same size{rank}"


def _agreement(before: Any, after: Any, reference: Any, key: str) -> Agreement:
    a, r = getattr(after, key), getattr(reference, key)
    return Agreement(before=getattr(before, key), after=a, reference=r, equal=a == r)


def _fold(model: nn.Module, dense: bool) -> tuple[nn.Module, int]:
    """The folded model (a plain LLaMA if `dense`) and the number of layers folded, in place."""
    from .model_dir import residual_layers

    folded = fold_model(model)
    if residual_layers(model):  # fold_model's contract; a failure here is a bug
        raise RuntimeError("residual layers left after fold_model")
    if not dense:
        return model, folded
    from .export import export_dense

    return export_dense(model), folded


def _write(report: FoldReport, model: nn.Module, tokenizer: Any, ckpt: Path, out: Path) -> None:
    """The output directory; its report and record name the input by its directory name only, so
    no file holds a path of this machine (the directory is published as it is)."""
    from .model_dir import read_meta, save_model_dir

    files = {"fold_report.json": {**report.to_dict(), "input": ckpt.resolve().name, "output": out.name}}
    extra = dict(read_meta(ckpt).get("extra", {}))
    if "val_loss" in extra:  # the fold is exact: the input's loss is the output's, and the card says so
        extra["unfolded_val_loss"] = extra["val_loss"]
    if report.kind == "dense":
        from .export import save_dense_dir

        save_dense_dir(model, tokenizer, out, files=files, extra={**extra, "exported_from": ckpt.resolve().name})
        return
    extra["folded_from"] = ckpt.resolve().name
    save_model_dir(model, tokenizer, out, extra=extra, files=files)


def _check_dense(ckpt: Path, config: Any) -> None:
    from .export import dense_refusal

    reason = dense_refusal(config)
    if reason:
        raise ConfigError(f"{str(ckpt)!r}: {reason}")


def fold_and_verify(ckpt: str | os.PathLike, out: str | os.PathLike | None = None, *, dense: bool = False,
                    check_batches: int = 2, batch_size: int = 2, tolerance: float = 1e-4, device: str = "cpu",
                    verify: bool = True, overwrite: bool = False, data: DataSpec | None = None) -> FoldReport:
    """Fold the DLR residual of the model directory `ckpt` into B, check it, and write `out`.

    The logits of `check_batches` validation batches of `data` (default: the bundled C4
    sample) must agree in fp32 within `tolerance` (max |diff| / max |logits|), and the
    parameter count and forward FLOPs must equal those of a plain lowrank model of the same
    size and rank (a dense LLaMA with `dense=True`, identity activation only). `out` defaults
    to <run>/folded beside <run>/final (else <ckpt>-folded, or <ckpt>-dense). Nothing is
    written unless the check passes (`report.passed`); the input is never modified. A
    directory with nothing to fold (see `nothing_to_fold`) is a ConfigError, as is every bad
    input, raised before any weight is read. The fold happens in place on the one loaded copy,
    so memory is the model plus the logits of the check batches.
    """
    from ..model.counting import model_stats
    from dlr.data import check_vocab
    from dlr.device import pick_device
    from ..model.llama import build_from_config
    from .model_dir import describe, load_model_dir, read_config

    ckpt, dev = Path(ckpt).expanduser(), pick_device(device)
    config = read_config(ckpt)
    if dense:
        _check_dense(ckpt, config)
    elif not foldable(config):
        raise ConfigError(f"nothing to fold: {nothing_to_fold(ckpt)}")
    target = resolve_out(ckpt, out, dense, overwrite)
    t0 = time.perf_counter()
    model, tokenizer = load_model_dir(ckpt, device=dev, dtype=torch.float32, verify=verify)
    check_vocab(tokenizer, model.config.vocab_size)
    batches = check_batches_of(data if data is not None else bundled_sample(), tokenizer, check_batches, batch_size)
    seq_len = int(batches[0]["input_ids"].shape[1])
    t_load = time.perf_counter() - t0
    ref, before = logits_of(model, batches, dev), model_stats(model, seq_len)
    result, folded = _fold(model, dense)
    del model  # after a dense export the low-rank copy is no longer needed; keep memory at one model
    max_abs, max_rel = compare(ref, logits_of(result, batches, dev))
    after = model_stats(result, seq_len)
    ref_cfg, reference_kind = _reference(config, dense)
    expected = model_stats(build_from_config(ref_cfg, device="meta"), seq_len)
    params = _agreement(before, after, expected, "total_params")
    params_ok = params.equal and after.non_embedding_params == expected.non_embedding_params
    flops = _agreement(before, after, expected, "forward_flops_per_token")
    tokens = int(sum(int((b["labels"] != -100).sum()) for b in batches))
    check = LogitsCheck(batches=len(batches), batch_size=batch_size, seq_len=seq_len, tokens=tokens, dtype="fp32",
                        device=str(dev), max_abs_diff=max_abs, max_rel_diff=max_rel, tolerance=tolerance)
    report = FoldReport(input=str(ckpt.resolve()), output=str(target), kind="dense" if dense else "fold",
                        model=describe(config), dlr={k: getattr(config, k) for k in KNOBS}, layers_folded=folded,
                        check=check, reference=reference_kind, params=dataclasses.replace(params, equal=params_ok),
                        forward_flops_per_token=flops, passed=bool(max_rel <= tolerance and params_ok and flops.equal),
                        seconds={"load_and_data": round(t_load, 3), "total": None}, peak_rss_mb=None)
    if not report.passed:
        return report
    report = dataclasses.replace(report, seconds={**report.seconds, "total": round(time.perf_counter() - t0, 3)},
                                 peak_rss_mb=round(peak_rss_mb(), 1))
    _write(report, result, tokenizer, ckpt, target)
    return report
