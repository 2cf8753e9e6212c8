"""dlr-fold: fold the DLR residual into B, verify, and write a new model directory.

    dlr-fold ckpt=runs/x/final                 # -> runs/x/folded
    dlr-fold ckpt=runs/x/final out=/tmp/f      # anywhere but over the input
    dlr-fold ckpt=runs/x/final dense=true      # identity activation: plain LlamaForCausalLM
    dlr-fold ckpt=runs/x/final verify=false    # skip the sha256 check of the input (trusted files)

The fold happens in place on the one loaded copy (B += sR touches only B's storage), so
memory is the model plus the logits of the check batches.
"""
from __future__ import annotations

import copy
import resource
import sys
import time
from pathlib import Path

import torch
import dataclasses

from dlr.model_dir import describe, load_model_dir, read_config, read_meta, residual_layers, save_model_dir
from dlr.cli._common import EXIT_CHECK_FAILED, from_overrides, required, run_cli
from dlr.counting import model_stats
from dlr.errors import ConfigError
from dlr.fold import fold_model
from dlr.model import build_from_config

PROG = "dlr-fold"
USAGE = __doc__


def default_out(ckpt: Path, dense: bool) -> Path:
    if dense:
        return ckpt.with_name(f"{ckpt.name}-dense")
    # The trainer writes <run>/final and <run>/folded; keep that pairing.
    return ckpt.with_name("folded") if ckpt.name == "final" else ckpt.with_name(f"{ckpt.name}-folded")


def resolve_out(ckpt: Path, out: str | None, dense: bool, overwrite: bool) -> Path:
    target = (Path(out).expanduser() if out else default_out(ckpt, dense)).resolve()
    src = ckpt.resolve()
    if target == src or src in target.parents or target in src.parents:
        # Writing replaces the target directory: any overlap would destroy the input.
        raise ConfigError(f"out={str(target)!r} overlaps the input checkpoint {str(src)!r}; choose a separate directory")
    if target.exists() and not overwrite:
        raise ConfigError(f"out={str(target)!r} already exists; pass overwrite=true or choose another out=")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"out={str(target)!r} exists and is not a directory")
    return target


def check_batches(cfg, tokenizer, n: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    from dlr.data import data_spec, validation_batches

    # Only the first few batches are used, so only tokenize about that much.
    data = dataclasses.replace(cfg.data, val_tokens=n * batch_size * cfg.data.seq_len)
    batches = validation_batches(data_spec(data), tokenizer, batch_size)[:n]
    if not batches:
        raise ConfigError("the data config's validation split is empty; the fold cannot be verified (choose data=)")
    return batches


@torch.no_grad()
def logits_of(model: torch.nn.Module, batches: list[dict], device: torch.device) -> list[torch.Tensor]:
    return [model(input_ids=b["input_ids"].to(device)).logits.float().cpu() for b in batches]


def compare(ref: list[torch.Tensor], new: list[torch.Tensor]) -> tuple[float, float]:
    """(max |diff|, max |diff| / max |ref|): a scale-free number, unlike elementwise rel. diff."""
    max_abs = max(float((a - b).abs().max()) for a, b in zip(ref, new))
    scale = max(float(a.abs().max()) for a in ref)
    return max_abs, max_abs / scale if scale > 0 else max_abs


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _validate(cfg) -> tuple[Path, int, int, float, torch.device]:
    # Types and ranges: dlr.config.FoldConfig (from_overrides); here what needs the machine.
    ckpt = Path(str(required(cfg, "ckpt", "runs/x/final"))).expanduser()
    dev = str(cfg.device)
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev!r} but no CUDA device is available; use device=cpu")
    return ckpt, cfg.check_batches, cfg.batch_size, float(cfg.tolerance), torch.device(dev)


def foldable(config) -> bool:
    """A DLR residual or a latent scale that has not been folded yet."""
    latent = config.dlr_latent_alpha is not None or config.dlr_trainable_latent_scale
    return not config.dlr_folded and config.dlr_method != "full" and (config.dlr_method == "dlr" or latent)


def fold_main(args: list[str]) -> int:
    cfg = from_overrides("fold", args)
    ckpt, n, bs, tol, device = _validate(cfg)
    config = read_config(ckpt)
    dense = cfg.dense
    if dense:
        from dlr.export import dense_refusal

        reason = dense_refusal(config)
        if reason:
            raise ConfigError(f"{str(ckpt)!r}: {reason}")
    elif not foldable(config):
        why = "already folded" if config.dlr_folded else f"a {config.dlr_method} checkpoint, it has no DLR residual"
        print(f"{PROG}: nothing to fold: {str(ckpt)!r} is {why} ({describe(config)}); nothing written")
        return 0
    out = resolve_out(ckpt, cfg.out, dense, cfg.overwrite)

    t0 = time.perf_counter()
    model, tokenizer = load_model_dir(ckpt, device=device, dtype=torch.float32, verify=bool(cfg.verify))
    from dlr.data import check_vocab

    check_vocab(tokenizer, model.config.vocab_size)
    batches = check_batches(cfg, tokenizer, n, bs)
    seq_len = int(batches[0]["input_ids"].shape[1])
    t_load = time.perf_counter() - t0
    ref = logits_of(model, batches, device)
    before = model_stats(model, seq_len)

    folded = fold_model(model)
    if residual_layers(model):  # fold_model's contract; a failure here is a bug
        raise RuntimeError("residual layers left after fold_model")
    if dense:
        from dlr.export import export_dense

        result = export_dense(model)
        del model  # the low-rank copy is no longer needed; keep memory at one model
        # Same LLaMA, method=full: the dense model's own reference layout.
        ref_cfg = copy.deepcopy(config)
        ref_cfg.dlr_method, ref_cfg.dlr_rank, ref_cfg.dlr_folded = "full", None, False
        reference_kind = "full (dense) model of the same size"
    else:
        result = model
        ref_cfg = copy.deepcopy(config)
        # dlr_folded: no residual and no latent scale, the bias (if any) kept.
        ref_cfg.dlr_method, ref_cfg.dlr_folded = "lowrank", True
        reference_kind = f"plain lowrank model of the same size and rank {config.dlr_rank}"
    new = logits_of(result, batches, device)
    max_abs, max_rel = compare(ref, new)
    stats = model_stats(result, seq_len)
    expected = model_stats(build_from_config(ref_cfg, device="meta"), seq_len)
    params_ok = stats.total_params == expected.total_params and stats.non_embedding_params == expected.non_embedding_params
    flops_ok = stats.forward_flops_per_token == expected.forward_flops_per_token
    passed = bool(max_rel <= tol and params_ok and flops_ok)
    tokens = int(sum(int((b["labels"] != -100).sum()) for b in batches))
    report = {
        "input": str(ckpt.resolve()),
        "output": str(out),
        "kind": "dense" if dense else "fold",
        "model": describe(config),
        "dlr": {k: getattr(config, k) for k in ("dlr_size", "dlr_method", "dlr_rank", "dlr_activation", "dlr_alpha",
                                                 "dlr_expand", "dlr_scope", "dlr_seed", "dlr_variance_correction",
                                                 "dlr_trainable_alpha", "dlr_latent_alpha",
                                                 "dlr_trainable_latent_scale", "dlr_bias")},
        "layers_folded": folded,
        "check": {"batches": len(batches), "batch_size": bs, "seq_len": seq_len, "tokens": tokens, "dtype": "fp32",
                  "device": str(device), "max_abs_diff": max_abs, "max_rel_diff": max_rel, "tolerance": tol},
        "reference": reference_kind,
        "params": {"before": before.total_params, "after": stats.total_params, "reference": expected.total_params,
                   "equal": params_ok},
        "forward_flops_per_token": {"before": before.forward_flops_per_token, "after": stats.forward_flops_per_token,
                                    "reference": expected.forward_flops_per_token, "equal": flops_ok},
        "passed": passed,
        "seconds": {"load_and_data": round(t_load, 3), "total": None},
        "peak_rss_mb": None,
    }
    if not passed:
        _print(report)
        print(f"{PROG}: verification failed (see above); nothing written", file=sys.stderr)
        return EXIT_CHECK_FAILED
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if dense:
        from dlr.export import save_dense_dir

        save_dense_dir(result, tokenizer, out, files={"fold_report.json": report})
    else:
        extra = dict(read_meta(ckpt).get("extra", {}))
        extra["folded_from"] = str(ckpt.resolve())
        save_model_dir(result, tokenizer, out, extra=extra, files={"fold_report.json": report})
    _print(report)
    return 0


def _print(r: dict) -> None:
    c = r["check"]
    lines = [
        f"{PROG}: {r['model']}: {'dense export' if r['kind'] == 'dense' else 'folded'} {r['layers_folded']} DLR layer(s)",
        f"  logits on {c['batches']} batch(es) x {c['batch_size']} x {c['seq_len']} ({c['tokens']} tokens, fp32): "
        f"max abs diff {c['max_abs_diff']:.3e}, max rel diff {c['max_rel_diff']:.3e} (tolerance {c['tolerance']:.0e})",
        f"  params {r['params']['after']:,} vs {r['reference']} {r['params']['reference']:,}: "
        f"{'equal' if r['params']['equal'] else 'DIFFERENT'}",
        f"  forward FLOPs/token {r['forward_flops_per_token']['after']:,} vs reference "
        f"{r['forward_flops_per_token']['reference']:,}: {'equal' if r['forward_flops_per_token']['equal'] else 'DIFFERENT'}",
    ]
    if r["passed"]:
        lines.append(f"  wrote {r['output']} (fold_report.json inside) in {r['seconds']['total']:.1f}s, "
                     f"peak RSS {r['peak_rss_mb']:.0f} MiB")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, USAGE, fold_main, argv)


if __name__ == "__main__":
    main()
