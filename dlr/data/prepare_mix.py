"""dlr-prepare of a mixture (data.source=mix): its train split written in the mixture's own order.

A mixture has no end, so a limit (tokens or documents) is required. The train split is the
first documents of the mixture sequence for `seed` (`dlr.data.mixture`), cut into shards of
`SHARD_DOCS` documents; each shard's record holds the mixture position after it, so a re-run
continues from the last finished shard and writes the same bytes. `data=tokens` then reads these
documents as any token shards (block-shuffled), so the proportions are the weights' draw.

The validation split is each source's validation documents, its weight's share of
`data.val_tokens` (as the streaming mixture's validation set), one shard per source in the order
of data.mix; `manifest["mix"]` records where each source's part ends, so that
`dlr.data.validation_set` cuts the rows per source as the streaming path does.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from dlr.data.mixture import MixStream
from dlr.data.shard_writing import Limit, finished_shard, write_shard
from dlr.data.shards import IDX_DTYPE, shard_stem
from dlr.data.sources import split_texts
from dlr.data.spec import DataSpec
from dlr.data.tokenizer import Tokenizer
from .validation_set import mix_budgets
from dlr.errors import ConfigError

log = logging.getLogger(__name__)
SHARD_DOCS = 50_000  # documents per train shard: the unit of resume
_CHUNK = 1000  # documents per encode_batch call (divides SHARD_DOCS: a shard ends at a chunk's end)


def _write(root: Path, stem: str, ids: list[list[int]], dtype: np.dtype, extra: dict) -> dict:
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=IDX_DTYPE)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([np.asarray(x, dtype=dtype) for x in ids]) if ids else np.zeros(0, dtype=dtype)
    return write_shard(root, stem, "mix", tokens, offsets, extra)


def _finished(root: Path, stem: str, dtype: np.dtype) -> dict | None:
    record = finished_shard(root, stem, dtype)
    return record if record is not None and "end" in record else None


def _train_shard(stream: MixStream, position: list[int] | None, tok: Tokenizer, limit, counts: np.ndarray, *,
                 root: Path, stem: str, dtype: np.dtype) -> dict:
    """The next SHARD_DOCS documents of the mixture from `position`, or fewer where `limit` falls."""
    cursor = stream.cursor(position)
    docs: Iterator[tuple[int, str, int]] = iter(cursor)
    ids: list[list[int]] = []
    per_source = [0] * len(stream.names)
    last = False
    while len(ids) < SHARD_DOCS and not last:
        chunk = [next(docs) for _ in range(_CHUNK)]
        enc = tok.encode_batch([t for _, t, _ in chunk])
        lens = np.fromiter((len(x) for x in enc), dtype=np.int64, count=len(enc))
        keep = limit.keep(lens, counts)
        last = keep is not None
        n = len(enc) if keep is None else keep
        counts += limit.counts(lens[:n])
        ids += enc[:n]
        for (_, _, s), x in zip(chunk[:n], enc[:n]):
            per_source[s] += len(x)
    return _write(root, stem, ids, dtype, {"end": cursor.position(), "last": last, "source_tokens": per_source})


def prepare_mix_train(spec: DataSpec, root: Path, tok: Tokenizer, limit, dtype: np.dtype, seed: int) -> dict:
    """The train split's shards, continuing after the finished ones."""
    if limit.documents is None and limit.tokens is None:
        raise ConfigError("a mixture has no end; accepted: dlr-prepare data=mix ... tokens=N (or documents=N)")
    stream = MixStream(spec, seed)
    shards: list[dict] = []
    counts = np.zeros(4, dtype=np.int64)
    position = None
    for k in range(1 << 30):
        stem = shard_stem("train", k)
        record = _finished(root, stem, dtype)
        if record is None:
            record = _train_shard(stream, position, tok, limit, counts, root=root, stem=stem, dtype=dtype)
        else:
            lengths = np.diff(np.fromfile(root / f"{stem}.idx", dtype=IDX_DTYPE))
            counts += limit.counts(lengths)
        shards.append(record)
        position = record["end"]
        if record["last"]:
            break
    tokens = [sum(sh["source_tokens"][s] for sh in shards) for s in range(len(stream.names))]
    return {"documents": int(counts[0]), "tokens": int(counts[1]), "complete": False, "shards": shards,
            "source_tokens": dict(zip(stream.names, tokens))}


def prepare_mix_validation(spec: DataSpec, root: Path, tok: Tokenizer, dtype: np.dtype) -> dict:
    """Each source's validation documents up to its share of val_tokens (in both batching modes)."""
    shards, ends, total_docs, total_tokens = [], [], 0, 0
    for s, ((name, w, sub), budget) in enumerate(zip(spec.mix, mix_budgets(spec))):
        if w <= 0:
            continue
        stem = shard_stem("validation", s)
        record = _finished(root, stem, dtype)
        if record is None:
            record = _validation_shard(replace(sub, val_tokens=budget), tok, root, stem, dtype, budget)
        shards.append(record)
        total_docs += record["documents"]
        total_tokens += record["tokens"]
        ends.append({"name": name, "weight": w, "val_tokens": budget, "validation_documents": total_docs})
    return {"documents": total_docs, "tokens": total_tokens, "complete": all(sh["complete"] for sh in shards),
            "shards": shards, "mix": ends}


def _validation_shard(sub: DataSpec, tok: Tokenizer, root: Path, stem: str, dtype: np.dtype, budget: int | None) -> dict:
    limit = Limit(val_tokens=budget, seq_len=sub.seq_len)
    counts = np.zeros(4, dtype=np.int64)
    ids: list[list[int]] = []
    texts = split_texts(sub, "validation")
    complete = True
    while not limit.met(counts):
        chunk = [t for _, t in zip(range(_CHUNK), texts)]
        if not chunk:
            break
        enc = tok.encode_batch(chunk)
        lens = np.fromiter((len(x) for x in enc), dtype=np.int64, count=len(enc))
        keep = limit.keep(lens, counts)
        n = len(enc) if keep is None else keep
        counts += limit.counts(lens[:n])
        ids += enc[:n]
        complete = keep is None
    if not ids:
        raise ConfigError(f"the validation split of mixture source {stem} has no documents")
    return _write(root, stem, ids, dtype, {"end": None, "last": True, "complete": complete})
