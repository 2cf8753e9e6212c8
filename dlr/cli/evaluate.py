"""dlr-eval: validation perplexity, corpus perplexity and benchmark tasks of a model directory.

    dlr-eval ckpt=runs/x/final                                  # hub C4 validation
    dlr-eval ckpt=runs/x/folded data=c4_sample eval_tokens=20000 out=res.json
    dlr-eval ckpt=DIR data=text data.validation_files=wikitext-2/test.txt --json   # sliding window
    dlr-eval ckpt=DIR tasks=c4_cloze                            # lm-evaluation-harness, offline task
    dlr-eval ckpt=DIR tasks=hellaswag,arc_easy num_fewshot=0    # hub tasks (need the network)
    dlr-eval ckpt=DIR verify=false                              # skip the sha256 check (trusted files)
    torchrun --nproc_per_node=2 -m dlr.cli.evaluate ckpt=DIR    # same number, split work

Uses the checkpoint's own tokenizer. protocol=rows: `dlr.data.validation_batches` (the fixed
first `val_tokens` tokens) and `dlr.evaluation.evaluate` (token-weighted, all-reduced), the
very code path of the trainer's final eval, hence the same number for the same budget.
protocol=sliding (the default for data=text): every token of the concatenated corpus, see
`dlr.corpus_eval`. tasks=...: `dlr.harness` (perplexity is then measured only if data= is given).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import dataclasses

from dlr.model_dir import DTYPES, describe, load_model_dir, read_config
from dlr.cli._common import dist_env, from_overrides, required, run_cli, write_json
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
    # Types and ranges: dlr.config.EvalConfig (from_overrides). Checked now, not after a long evaluation:
    if cfg.out and Path(str(cfg.out)).expanduser().is_dir():
        raise ConfigError(f"out={str(cfg.out)!r} is a directory; give a JSON file name, e.g. out=eval.json")


def eval_main(args: list[str]) -> int:
    # `--json` is the conventional switch; Hydra only knows key=value.
    args = ["json=true" if a == "--json" else a for a in args]
    from dlr.harness import split_task_override

    args = split_task_override(args)
    cfg = from_overrides("eval", args)
    _validate(cfg)
    ckpt = Path(str(required(cfg, "ckpt", "runs/x/final"))).expanduser()
    rank, world, local_rank = dist_env()
    device = pick_device(str(cfg.device), local_rank)

    from dlr.data import check_vocab, data_spec

    # Everything cheap is validated before the weights are read.
    config = read_config(ckpt)
    tasks = None
    if cfg.tasks is not None:
        from dlr.harness import parse_tasks

        tasks = parse_tasks(cfg.tasks, cfg.num_fewshot, cfg.limit, cfg.include_path)
    # With tasks=..., perplexity is measured only when a data config is asked for.
    want_ppl = tasks is None or any(a.split("=", 1)[0].lstrip("+") in ("data", "eval_tokens", "protocol") for a in args)
    spec = None
    if want_ppl:
        data = cfg.data if cfg.eval_tokens is None else dataclasses.replace(cfg.data, val_tokens=int(cfg.eval_tokens))
        spec = data_spec(data)
    protocol = str(cfg.protocol)
    if protocol == "auto" and spec is not None:
        protocol = "sliding" if spec.source == "text" else "rows"
    if protocol == "sliding" and spec is not None:
        from dlr.corpus_eval import check_window

        if spec.source not in ("hub", "json", "text"):
            raise ConfigError(f"protocol=sliding reads documents; data.source={spec.source!r} holds prepared token "
                              "shards; accepted there: protocol=rows (or auto)")
        check_window(spec.seq_len, _stride(cfg, spec))

    started_pg = False
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
        started_pg = True
    result: dict = {"ckpt": str(ckpt.resolve()), "model": describe(config), "folded": bool(config.dlr_folded),
                    "dtype": cfg.dtype, "device": str(device), "world_size": world}
    try:
        t0 = time.perf_counter()
        model, tokenizer = load_model_dir(ckpt, device=device, dtype=torch.float32, verify=bool(cfg.verify))
        check_vocab(tokenizer, model.config.vocab_size)
        dtype = None if cfg.dtype == "fp32" else DTYPES[cfg.dtype]
        if spec is not None:
            result.update(_perplexity(cfg, spec, protocol, model, tokenizer, device, dtype, rank, world))
        if tasks is not None:
            from dlr.harness import run_tasks

            if world > 1:
                raise ConfigError("tasks=... runs in one process; launch dlr-eval without torchrun for benchmarks")
            result["tasks"] = run_tasks(model, ckpt, tasks, batch_size=int(cfg.batch_size), device=device,
                                        dtype=cfg.dtype)
        result["seconds"] = round(time.perf_counter() - t0, 3)
    finally:
        if started_pg:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    if cfg.out:
        write_json(str(cfg.out), result)
    if "val_loss" in result and (result["tokens"] == 0 or not math.isfinite(result["val_loss"])):
        print(f"{PROG}: warning: {result['tokens']} tokens evaluated, val_loss={result['val_loss']}", file=sys.stderr)
    if cfg.json:
        import json

        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        where = f"({describe(config)}, {cfg.dtype}, {device}, {world} process(es), {result['seconds']:.1f}s)"
        if "val_ppl" in result:
            line = f"val_ppl={result['val_ppl']:.4f} val_loss={result['val_loss']:.6f} tokens={result['tokens']}"
            if result.get("word_ppl") is not None:
                line += f" word_ppl={result['word_ppl']:.4f} bits_per_byte={result['bits_per_byte']:.4f}"
            print(f"{line} [{result['protocol']}] {where}")
        for name, metrics in (result.get("tasks") or {}).items():
            shown = " ".join(f"{k}={v:.4f}" + (f"±{metrics[k + '_stderr']:.4f}" if isinstance(metrics.get(k + "_stderr"), float) else "")
                             for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_stderr") and k != "version")
            print(f"{name}: {shown} (n={metrics.get('samples')}) {where}")
    return 0


def _data_description(spec, files: list[str] | tuple[str, ...]) -> dict:
    """What was actually read: the hub dataset for source=hub, the files otherwise."""
    d = {"source": spec.source, "seq_len": spec.seq_len, "mode": spec.mode, "val_tokens": spec.val_tokens}
    if spec.source == "hub":
        d.update({"path": spec.path, "name": spec.name})
    if spec.source == "text":
        d["sample_by"] = spec.sample_by
    if spec.source == "tokens":  # a dlr-prepare directory of token shards
        d["path"] = spec.path
    d["validation_files"] = list(files)
    return d


def _stride(cfg, spec) -> int:
    return int(cfg.stride) if cfg.stride is not None else max(1, spec.seq_len // 2)


def _perplexity(cfg, spec, protocol: str, model, tokenizer, device, dtype, rank: int, world: int) -> dict:
    from dlr.corpus_eval import check_coverage, corpus_metrics, load_corpus, sliding_batches, split_tokens
    from dlr.data import resolve_files, validation_batches
    from dlr.evaluation import evaluate

    progress = bool(cfg.progress) and rank == 0
    min_cov = float(cfg.min_coverage)
    corpus_check = spec.source == "text"  # a fixed C4 budget is the pre-training protocol, not a corpus
    if protocol == "sliding":
        window, stride = spec.seq_len, _stride(cfg, spec)
        corpus = load_corpus(spec, tokenizer, budget=spec.val_tokens)
        if corpus_check:
            check_coverage(corpus.scored_tokens, corpus.corpus_tokens, min_cov,
                           f"eval_tokens={spec.val_tokens} (data.val_tokens)",
                           f"set eval_tokens >= {corpus.corpus_tokens}")
        batches = sliding_batches(corpus.ids, window, stride, int(cfg.batch_size), tokenizer.pad_id, rank, world)
        res = evaluate(model, batches, device, dtype=dtype, progress=progress)
        out = {"val_ppl": res["val_ppl"], "val_loss": res["val_loss"], "tokens": res["val_tokens"],
               "protocol": "sliding", "window": window, "stride": stride}
        out.update(corpus_metrics(res["val_loss"], res["val_tokens"], corpus))
        out["data"] = _data_description(spec, corpus.files)
        return out
    # The files read (the hub's are listed by validation_batches itself; token shards have none).
    files = resolve_files(spec, "validation") if spec.source in ("json", "text") else spec.validation_files
    batches = validation_batches(spec, tokenizer, cfg.batch_size, rank=rank, world_size=world)
    if corpus_check:
        total = split_tokens(spec, tokenizer)
        scored = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        if world > 1:
            t = torch.tensor(scored, device=device)
            torch.distributed.all_reduce(t)
            scored = int(t)
        check_coverage(scored, total, min_cov, f"protocol=rows (data.mode={spec.mode}, sample_by={spec.sample_by})",
                       "use protocol=sliding (every token of the corpus, the default for data=text)")
    res = evaluate(model, batches, device, dtype=dtype, progress=progress)
    return {"val_ppl": res["val_ppl"], "val_loss": res["val_loss"], "tokens": res["val_tokens"], "protocol": "rows",
            "data": _data_description(spec, files)}


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, USAGE, eval_main, argv)


if __name__ == "__main__":
    main()
