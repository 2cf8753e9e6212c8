"""The evaluation protocols of a model directory, each returning a typed report.

- `rows_perplexity`: the pre-training protocol, `dlr.data.validation_batches` (the fixed first
  `val_tokens` tokens, one row per document) through `dlr.eval.loss.evaluate`, the very code
  path of the trainer's final eval, hence the same number for the same budget;
- `sliding_perplexity`: corpus perplexity, every token of the concatenated corpus scored once
  by a sliding window (`dlr.eval.corpus`), plus word perplexity and bits per byte;
- `dlr.eval.harness.run_tasks`: lm-evaluation-harness tasks.

`evaluate_checkpoint` loads a model directory and runs what is asked for: perplexity with
the protocol `resolve_protocol` picks (sliding for plain-text corpora, rows otherwise), and/or
tasks. Under torchrun the perplexity work is split over the processes and all-reduced.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlr.data.formats import source_kind
from dlr.data.spec import DataSpec
from dlr.data.tokenizer import Tokenizer
from dlr.device import dist_env, pick_device
from dlr.config.choices import DTYPE_NAMES, EVAL_PROTOCOLS
from dlr.errors import ConfigError
from dlr.eval.corpus import CorpusMetrics
from dlr.eval.harness import TaskRequest


@dataclass(frozen=True)
class PerplexityReport:
    """Token-weighted validation loss and perplexity, and what was read to get them."""

    val_ppl: float
    val_loss: float
    tokens: int  # label tokens scored, over all processes
    protocol: str  # "rows" or "sliding"
    data: dict[str, Any]  # the data actually read (source, files, seq_len, ...)
    window: int | None = None  # sliding only
    stride: int | None = None  # sliding only
    corpus: CorpusMetrics | None = None  # sliding only

    def to_dict(self) -> dict[str, Any]:
        """The flat record dlr-eval writes (the corpus figures beside the loss)."""
        out: dict[str, Any] = {"val_ppl": self.val_ppl, "val_loss": self.val_loss, "tokens": self.tokens,
                               "protocol": self.protocol, "data": self.data}
        if self.protocol == "sliding":
            out.update(window=self.window, stride=self.stride)
        if self.corpus is not None:
            out.update(dataclasses.asdict(self.corpus))
        return out


@dataclass(frozen=True)
class EvalReport:
    """Everything `evaluate_checkpoint` measured on one model directory."""

    ckpt: str
    model: str  # dlr.artifacts.model_dir.describe of its config
    folded: bool
    dtype: str
    device: str
    num_processes: int  # the torchrun processes that shared the perplexity work
    seconds: float
    perplexity: PerplexityReport | None = None
    tasks: dict[str, dict[str, Any]] | None = None  # {task: {metric: value, metric_stderr: ..., samples, ...}}

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of `dlr-eval --json` and `out=`."""
        out: dict[str, Any] = {"ckpt": self.ckpt, "model": self.model, "folded": self.folded, "dtype": self.dtype,
                               "device": self.device, "num_processes": self.num_processes, "seconds": self.seconds}
        if self.perplexity is not None:
            out.update(self.perplexity.to_dict())
        if self.tasks is not None:
            out["tasks"] = self.tasks
        return out


def default_stride(spec: DataSpec, stride: int | None) -> int:
    """Half a window of new tokens per window unless told otherwise."""
    return stride if stride is not None else max(1, spec.seq_len // 2)


def resolve_protocol(protocol: str, spec: DataSpec, stride: int | None = None) -> str:
    """`auto` -> sliding for plain-text corpora, rows otherwise; checked before any weight is read."""
    from dlr.eval.corpus import check_window

    if protocol not in EVAL_PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r} is not valid; accepted: {', '.join(EVAL_PROTOCOLS)}")
    kind = source_kind(spec.source)
    if protocol == "auto":
        protocol = "sliding" if kind.corpus else "rows"
    if protocol == "sliding":
        if kind.no_sliding:
            raise ConfigError(f"protocol=sliding reads one corpus's documents; data.source={spec.source!r} "
                              f"{kind.no_sliding}; accepted there: protocol=rows (or auto)")
        check_window(spec.seq_len, default_stride(spec, stride))
    return protocol


def _process_place() -> tuple[int, int]:
    """(process_index, num_processes) of this process in the evaluation's process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def data_description(spec: DataSpec, files: Sequence[str]) -> dict[str, Any]:
    """What was actually read: the settings its source is described by (the hub dataset, the
    token shards' directory, ...) and the files."""
    d: dict[str, Any] = {"source": spec.source, "seq_len": spec.seq_len, "mode": spec.mode,
                         "val_tokens": spec.val_tokens}
    d.update({k: getattr(spec, k) for k in source_kind(spec.source).described_by})
    if spec.holdout is not None:  # validation = the first holdout documents of the train files
        d["holdout"] = spec.holdout
    if spec.mix:
        d["mix"] = [{"name": n, "weight": w} for n, w, _ in spec.mix]
    d["validation_files"] = list(files)
    return d


def sliding_perplexity(model: torch.nn.Module, tokenizer: Tokenizer, spec: DataSpec, *, stride: int | None = None,
                       batch_size: int = 16, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                       min_coverage: float = 0.99, progress: bool = False) -> PerplexityReport:
    """Corpus perplexity of the validation split of `spec`: windows of `spec.seq_len` tokens
    moving by `stride`, every token scored once (see dlr.eval.corpus). For a text corpus,
    scoring less than `min_coverage` of it (a `val_tokens` budget too small) is a ConfigError."""
    from dlr.eval.corpus import check_coverage, corpus_metrics, load_corpus, sliding_batches
    from dlr.eval.loss import evaluate

    process_index, num_processes = _process_place()
    window, stride = spec.seq_len, default_stride(spec, stride)
    corpus = load_corpus(spec, tokenizer, budget=spec.val_tokens)
    if source_kind(spec.source).corpus:  # a fixed C4 budget is the pre-training protocol, not a corpus
        check_coverage(corpus.scored_tokens, corpus.corpus_tokens, min_coverage,
                       f"eval_tokens={spec.val_tokens} (data.val_tokens)", f"set eval_tokens >= {corpus.corpus_tokens}")
    batches = sliding_batches(corpus.ids, window, stride, batch_size, tokenizer.pad_id,
                              process_index=process_index, num_processes=num_processes)
    res = evaluate(model, batches, device, dtype=dtype, progress=progress and process_index == 0)
    return PerplexityReport(val_ppl=res["val_ppl"], val_loss=res["val_loss"], tokens=res["val_tokens"],
                            protocol="sliding", data=data_description(spec, corpus.files), window=window,
                            stride=stride, corpus=corpus_metrics(res["val_loss"], res["val_tokens"], corpus))


def _scored_everywhere(batches: list[dict[str, torch.Tensor]], device: torch.device | str) -> int:
    scored = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    if _process_place()[1] > 1:
        t = torch.tensor(scored, device=device)
        torch.distributed.all_reduce(t)
        scored = int(t)
    return scored


def rows_perplexity(model: torch.nn.Module, tokenizer: Tokenizer, spec: DataSpec, *, batch_size: int = 16,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None, min_coverage: float = 0.99,
                    progress: bool = False) -> PerplexityReport:
    """Validation perplexity on the fixed validation set of `spec` (the trainer's final eval).
    For a text corpus, rows that score less than `min_coverage` of it are a ConfigError."""
    from dlr.data import resolve_files, validation_batches
    from dlr.eval.corpus import check_coverage, split_tokens
    from dlr.eval.loss import evaluate

    process_index, num_processes = _process_place()
    kind = source_kind(spec.source)
    # The files read (the hub's are listed by validation_batches itself; token shards have none).
    files = (resolve_files(spec, "validation") if kind.local_files else
             [f for _, _, sub in spec.mix for f in sub.validation_files] if spec.mix else spec.validation_files)
    batches = validation_batches(spec, tokenizer, batch_size, process_index=process_index,
                                 num_processes=num_processes)
    if kind.corpus:
        check_coverage(_scored_everywhere(batches, device), split_tokens(spec, tokenizer), min_coverage,
                       f"protocol=rows (data.mode={spec.mode}, sample_by={spec.sample_by})",
                       "use protocol=sliding (every token of the corpus, the default for data=text)")
    res = evaluate(model, batches, device, dtype=dtype, progress=progress and process_index == 0)
    return PerplexityReport(val_ppl=res["val_ppl"], val_loss=res["val_loss"], tokens=res["val_tokens"],
                            protocol="rows", data=data_description(spec, files))


@contextlib.contextmanager
def _process_group(device: torch.device, num_processes: int) -> Iterator[None]:
    """One process group for a torchrun launch, unless the caller started one already."""
    if num_processes <= 1 or torch.distributed.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _task_request(tasks: TaskRequest | str | Sequence[str] | None) -> TaskRequest | None:
    from dlr.eval.harness import parse_tasks

    if tasks is None or isinstance(tasks, TaskRequest):
        return tasks
    return parse_tasks(tasks, None, None, None)


def evaluate_checkpoint(ckpt: str | os.PathLike, *, data: DataSpec | None = None, protocol: str = "auto",
                        stride: int | None = None, tasks: TaskRequest | str | Sequence[str] | None = None,
                        batch_size: int = 16, device: str = "auto", dtype: str = "fp32", verify: bool = True,
                        min_coverage: float = 0.99, progress: bool = False) -> EvalReport:
    """Perplexity of the model directory `ckpt` on `data` (skipped when None) and/or the
    lm-evaluation-harness `tasks` (names or a `dlr.eval.harness.parse_tasks` request).

    Every cheap check runs before the weights are read. `dtype="bf16"` autocasts (the weights
    stay fp32). Under torchrun (RANK/WORLD_SIZE set) each process scores its share and every
    process gets the same report; tasks run in one process only.
    """
    from dlr.data import check_vocab
    from ..artifacts.model_dir import DTYPES, describe, load_model_dir, read_config

    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r} is not valid; accepted: {', '.join(DTYPE_NAMES)}")
    ckpt = Path(ckpt).expanduser()
    _, num_processes, local_rank = dist_env()
    dev = pick_device(device, local_rank)
    config = read_config(ckpt, dense=True)  # the dense export too, as a plain LlamaForCausalLM
    request = _task_request(tasks)
    if request is not None and num_processes > 1:
        raise ConfigError("tasks=... runs in one process; launch dlr-eval without torchrun for benchmarks")
    protocol = resolve_protocol(protocol, data, stride) if data is not None else protocol
    with _process_group(dev, num_processes):
        t0 = time.perf_counter()
        model, tokenizer = load_model_dir(ckpt, device=dev, dtype=torch.float32, verify=verify, dense=True)
        check_vocab(tokenizer, model.config.vocab_size)
        kw = dict(batch_size=batch_size, device=dev, dtype=None if dtype == "fp32" else DTYPES[dtype],
                  min_coverage=min_coverage, progress=progress)
        ppl = None
        if data is not None:
            ppl = sliding_perplexity(model, tokenizer, data, stride=stride, **kw) if protocol == "sliding" \
                else rows_perplexity(model, tokenizer, data, **kw)
        scores = None
        if request is not None:
            from dlr.eval.harness import run_tasks

            scores = run_tasks(model, ckpt, request, batch_size=batch_size, device=dev, dtype=dtype)
        seconds = round(time.perf_counter() - t0, 3)
    return EvalReport(ckpt=str(ckpt.resolve()), model=describe(config), folded=bool(getattr(config, "dlr_folded", False)), dtype=dtype,
                      device=str(dev), num_processes=num_processes, seconds=seconds, perplexity=ppl, tasks=scores)
