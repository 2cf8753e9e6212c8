"""The fixed validation set: the first `val_tokens` tokens of the validation split, in order.

Rows are built once, identically on every process, then row i goes to process i % num_processes,
so the union over processes never depends on the number of processes.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from dlr.data.sources import check_local_file, split_parts, split_texts
from dlr.data.spec import DataSpec, check_process
from dlr.data.tokenizer import Tokenizer
from dlr.errors import ConfigError

log = logging.getLogger(__name__)
_CHUNK = 256  # documents tokenized per call


def _token_lists(spec: DataSpec, tokenizer: Tokenizer):
    chunk: list[str] = []
    for text in split_texts(spec, "validation"):
        chunk.append(text)
        if len(chunk) == _CHUNK:
            yield from tokenizer.encode_batch(chunk)
            chunk = []
    if chunk:
        yield from tokenizer.encode_batch(chunk)


def _pad_rows(rows: list[list[int]], T: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.full((len(rows), T), pad, dtype=np.int64)
    y = np.full((len(rows), T), -100, dtype=np.int64)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
        y[i, : len(r)] = r
    return torch.from_numpy(x), torch.from_numpy(y)


def validation_rows(spec: DataSpec, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) LongTensor[N, seq_len] of the whole fixed validation set."""
    if spec.source == "tokens":
        return _shard_rows(spec, tokenizer)
    if spec.source == "mix":
        return _mix_rows(spec, tokenizer)
    files = [p.path for p in split_parts(spec, "validation")]
    for f in files:
        check_local_file(spec, f)
    ids, labels, used, docs = _rows(spec, tokenizer, _token_lists(spec, tokenizer), f"files: {', '.join(files[:3])}")
    if spec.val_tokens is not None and used < spec.val_tokens:
        log.warning("validation split holds only %d tokens (%d documents), below val_tokens=%d; using all of it",
                    used, docs, spec.val_tokens)
    return ids, labels


def mix_budgets(spec: DataSpec) -> list[int | None]:
    """Each mixture source's share of data.val_tokens, by its weight (None: its whole validation split)."""
    total = sum(w for _, w, _ in spec.mix)
    if spec.val_tokens is None:
        return [None] * len(spec.mix)
    return [max(1, round(spec.val_tokens * w / total)) for _, w, _ in spec.mix]


def _mix_rows(spec: DataSpec, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture's validation set: each source's own (held-out) validation rows, its weight's share
    of the budget, in the order of data.mix. A source of weight 0 is not measured."""
    parts = [validation_rows(replace(sub, val_tokens=budget), tokenizer)
             for (_, w, sub), budget in zip(spec.mix, mix_budgets(spec)) if w > 0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _shard_rows(spec: DataSpec, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows from the validation documents that dlr-prepare stored (same ids, same order)."""
    from dlr.data.shards import SplitShards, read_manifest
    from dlr.data.token_batches import check_tokenizer

    manifest = read_manifest(spec.path)
    check_tokenizer(manifest, tokenizer, spec.path)
    shards = SplitShards(spec.path, "validation", manifest)
    if "mix" in manifest:
        return _prepared_mix_rows(spec, tokenizer, shards, manifest["mix"]["validation"])
    ids, labels, used, docs = _rows(spec, tokenizer, shards.iter_documents(), f"data.path={spec.path}")
    short = spec.val_tokens is None or used < spec.val_tokens
    if short and not shards.complete:
        want = "the whole validation split (data.val_tokens=null)" if spec.val_tokens is None else f"data.val_tokens={spec.val_tokens}"
        raise ConfigError(
            f"data.path={spec.path!r} holds only the first {used} validation tokens for mode={spec.mode} "
            f"seq_len={spec.seq_len}, but this run asks for {want}; set data.val_tokens<={used} or re-run dlr-prepare "
            f"with a larger data.val_tokens"
        )
    if spec.val_tokens is not None and used < spec.val_tokens:
        log.warning("validation split holds only %d tokens (%d documents), below val_tokens=%d; using all of it",
                    used, docs, spec.val_tokens)
    return ids, labels


def _rows(spec: DataSpec, tokenizer: Tokenizer, token_lists, where: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Rows from documents' token lists, in order; also the label tokens used and documents read."""
    T, eos, pad = spec.seq_len, tokenizer.eos_id, tokenizer.pad_id
    budget = spec.val_tokens if spec.val_tokens is not None else float("inf")
    used, docs = 0, 0
    if spec.mode == "paper":
        rows: list[list[int]] = []
        for seq in token_lists:
            docs += 1
            row = seq[: T - 1] + [eos]
            # Real (non-pad) tokens count against the budget; the last document is cut to fit.
            row = row[: int(min(len(row), budget - used))]
            rows.append(row)
            used += len(row)
            if used >= budget:
                break
        if not rows:
            raise ConfigError(f"the validation split has no documents ({where})")
        ids, labels = _pad_rows(rows, T, pad)
    else:
        stream: list[int] = []
        for seq in token_lists:
            docs += 1
            stream.extend(seq)
            stream.append(eos)
            if len(stream) >= budget:
                break
        if not stream:
            raise ConfigError(f"the validation split has no documents ({where})")
        stream = stream[: int(min(len(stream), budget))]
        used = len(stream)
        n_rows = -(-len(stream) // T)
        flat = np.full(n_rows * T, pad, dtype=np.int64)
        flat[: len(stream)] = stream
        lab = np.full(n_rows * T, -100, dtype=np.int64)
        lab[: len(stream)] = stream
        ids, labels = torch.from_numpy(flat).view(n_rows, T), torch.from_numpy(lab).view(n_rows, T)
    return ids, labels, used, docs


def _prepared_mix_rows(spec: DataSpec, tokenizer: Tokenizer, shards, parts: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared mixture's validation rows, cut source by source as `_mix_rows` cuts the streamed ones."""
    docs = shards.iter_documents()
    total = sum(p["weight"] for p in parts)
    out, start = [], 0
    for part in parts:
        budget = None if spec.val_tokens is None else max(1, round(spec.val_tokens * part["weight"] / total))
        if part["val_tokens"] is not None and (budget is None or budget > part["val_tokens"]):
            raise ConfigError(f"data.path={spec.path!r} holds the first {part['val_tokens']} validation tokens of "
                              f"mixture source {part['name']!r}, but data.val_tokens={spec.val_tokens} asks for {budget}; "
                              f"accepted: a data.val_tokens no larger than the one prepared, or re-run dlr-prepare")
        n, start = part["validation_documents"] - start, part["validation_documents"]
        mine = [next(docs) for _ in range(n)]
        ids, labels, _, _ = _rows(replace(spec, val_tokens=budget), tokenizer, iter(mine), f"data.path={spec.path}")
        out.append((ids, labels))
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def validation_batches(spec: DataSpec, tokenizer: Tokenizer, batch_size: int, process_index: int = 0,
                       num_processes: int = 1) -> list[dict[str, torch.Tensor]]:
    """This process's share (rows process_index, process_index + num_processes, ...) of the fixed validation set."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is not valid; accepted: an integer >= 1")
    check_process(process_index, num_processes)
    ids, labels = validation_rows(spec, tokenizer)
    ids, labels = ids[process_index::num_processes], labels[process_index::num_processes]
    return [{"input_ids": ids[i: i + batch_size].contiguous(), "labels": labels[i: i + batch_size].contiguous()}
            for i in range(0, ids.shape[0], batch_size)]
