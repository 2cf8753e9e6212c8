"""dlr-eval: validation loss / perplexity of a model directory.

    dlr-eval ckpt=runs/x/final                                  # hub C4 validation
    dlr-eval ckpt=runs/x/folded data=c4_sample eval_tokens=20000 out=res.json
    dlr-eval ckpt=DIR data=text data.validation_files='corpus/*.txt' --json
    dlr-eval ckpt=DIR verify=false                              # skip the sha256 check (trusted files)
    torchrun --nproc_per_node=2 -m dlr.cli.evaluate ckpt=DIR    # same number, split work

Uses the checkpoint's own tokenizer, `dlr.data.validation_batches` (the fixed first
`val_tokens` tokens) and `dlr.evaluation.evaluate` (token-weighted, all-reduced): the very
code path of the trainer's final eval, hence the same number for the same budget.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dlr.model_dir import DTYPES, describe, load_model_dir, read_config
from dlr.cli._common import dist_env, load_config, required, run_cli, write_json
from dlr.errors import ConfigError, bad_value

PROG = "dlr-eval"
USAGE = __doc__


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
        # Under torchrun each process takes its own GPU.
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    raise bad_value("device", name, "auto, cpu, cuda, cuda:N")  # the schema refuses it first


def _validate(cfg) -> None:
    # Types and ranges: dlr.schema.EvalConfig (load_config). Checked now, not after a long evaluation:
    if cfg.out and Path(str(cfg.out)).expanduser().is_dir():
        raise ConfigError(f"out={str(cfg.out)!r} is a directory; give a JSON file name, e.g. out=eval.json")


def eval_main(args: list[str]) -> int:
    # `--json` is the conventional switch; Hydra only knows key=value.
    args = ["json=true" if a == "--json" else a for a in args]
    cfg = load_config("eval", args)
    _validate(cfg)
    ckpt = Path(str(required(cfg, "ckpt", "runs/x/final"))).expanduser()
    rank, world, local_rank = dist_env()
    device = pick_device(str(cfg.device), local_rank)

    from dlr.data import check_vocab, data_spec, validation_batches
    from dlr.evaluation import evaluate

    # Everything cheap is validated before the weights are read.
    config = read_config(ckpt)
    data = OmegaConf.to_container(cfg.data, resolve=False)
    if cfg.eval_tokens is not None:
        data["val_tokens"] = int(cfg.eval_tokens)
    spec = data_spec(data)

    started_pg = False
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
        started_pg = True
    try:
        t0 = time.perf_counter()
        model, tokenizer = load_model_dir(ckpt, device=device, dtype=torch.float32, verify=bool(cfg.verify))
        check_vocab(tokenizer, model.config.vocab_size)
        batches = validation_batches(spec, tokenizer, cfg.batch_size, rank=rank, world_size=world)
        dtype = None if cfg.dtype == "fp32" else DTYPES[cfg.dtype]
        res = evaluate(model, batches, device, dtype=dtype, progress=bool(cfg.progress) and rank == 0)
        seconds = time.perf_counter() - t0
    finally:
        if started_pg:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    result = {
        "val_ppl": res["val_ppl"],
        "val_loss": res["val_loss"],
        "tokens": res["val_tokens"],
        "ckpt": str(ckpt.resolve()),
        "model": describe(config),
        "folded": bool(config.dlr_folded),
        "data": {"source": spec.source, "path": spec.path, "validation_files": list(spec.validation_files),
                 "seq_len": spec.seq_len, "mode": spec.mode, "val_tokens": spec.val_tokens},
        "dtype": cfg.dtype,
        "device": str(device),
        "world_size": world,
        "seconds": round(seconds, 3),
    }
    if cfg.out:
        write_json(str(cfg.out), result)
    if res["val_tokens"] == 0 or not math.isfinite(res["val_loss"]):
        print(f"{PROG}: warning: {res['val_tokens']} tokens evaluated, val_loss={res['val_loss']}", file=sys.stderr)
    if cfg.json:
        import json

        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"val_ppl={res['val_ppl']:.4f} val_loss={res['val_loss']:.6f} tokens={res['val_tokens']} "
              f"({describe(config)}, {cfg.dtype}, {device}, {world} process(es), {seconds:.1f}s)")
    return 0


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, USAGE, eval_main, argv)


if __name__ == "__main__":
    main()
