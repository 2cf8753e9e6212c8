"""Tokenize a data config once into token shards (`dlr-prepare`); see dlr/data/shards.py for the format.

One shard per input file, so `num_proc` processes tokenize files side by side and a shard is
the unit of resume: each is written to temporary files, renamed, then recorded in its own
`<stem>.json`; a re-run skips recorded shards and redoes the rest. Shards are taken in input
file order and the limits (train: `tokens` or `documents`; validation: `val_tokens`) cut the
split at the first document that reaches them, so the result does not depend on `num_proc`.
`manifest.json` is written last; with it present a re-run with the same settings does nothing.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dlr.data.shards import (FORMAT, FORMAT_VERSION, IDX_DTYPE, MANIFEST, SPLITS, TOKENIZER_DIR, check_shard_files,
                             dtype_for, shard_stem)
from dlr.data.prepare_mix import prepare_mix_train, prepare_mix_validation
from dlr.data.shard_writing import Limit, finished_shard, remove_shard, write_json, write_shard
from dlr.data.sources import Part, check_local_file, iter_file, split_parts
from dlr.data.spec import DataSpec
from dlr.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_hash
from dlr.atomic import check_writable
from dlr.errors import ConfigError, bad_value

# The names tests and older callers import from here.
_write_shard, _done = write_shard, finished_shard
log = logging.getLogger(__name__)
MIX_SEED = 0  # a prepared mixture's order: the documents of data=mix with seed 0
PLAN = "prepare.json"
PLAN_KEYS = ("source", "files", "tokenizer", "dtype", "limits")
_CHUNK = 1000  # documents per encode_batch call


class _Report:
    """What a worker calls with each chunk's token count: a queue in a pool, a callback in-process."""

    def __init__(self, queue: Any = None, callback: Any = None) -> None:
        self.queue, self.callback = queue, callback

    def __call__(self, n: int) -> None:
        if self.queue is not None:
            self.queue.put(n)
        elif self.callback is not None:
            self.callback(n)


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """One input file to tokenize into one shard. Frozen and plain so that it pickles: a pool
    hands it to a spawned worker process."""

    spec: DataSpec
    tokenizer_dir: str
    path: str
    root: str
    stem: str
    limit: Limit
    threads: int  # tokenizer threads; 1 in a pool, whose processes are the parallelism, -1 = its default
    start: int = 0  # the file's records [start, stop) (data.holdout splits a file between the splits)
    stop: int | None = None


def _job_tokenizer(job: ShardJob) -> Tokenizer:
    if job.threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(job.tokenizer_dir)
    if hasattr(tok, "num_threads"):
        tok.num_threads = job.threads
    return tok


def tokenize_file(job: ShardJob, report: _Report) -> dict:
    """Tokenize one input file into shard `job.stem` (stopping early once `job.limit` alone is met)."""
    tok = _job_tokenizer(job)
    limit = job.limit
    dtype = dtype_for(tok.vocab_size)
    lengths: list[int] = []
    counts = np.zeros(4, dtype=np.int64)
    chunk: list[str] = []
    # Tokens go to disk chunk by chunk: a C4 file (~170M tokens) never sits in memory whole.
    out = open(Path(job.root) / f"{job.stem}.bin.tmp", "wb")

    def flush() -> bool:
        """Tokenize the chunk; True when the limit fell inside it (documents after it dropped)."""
        nonlocal counts
        ids = tok.encode_batch(chunk)
        chunk.clear()
        lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        keep = limit.keep(lens, counts)
        n = len(ids)
        if keep is not None:
            ids, lens = ids[:keep], lens[:keep]
        if ids:
            np.concatenate([np.asarray(x, dtype=dtype) for x in ids]).tofile(out)
        lengths.extend(lens.tolist())
        counts = counts + limit.counts(lens)
        report(int(lens.sum()))
        return keep is not None and keep < n

    with out:
        records = iter_file(job.spec, job.path, start=job.start, stop=job.stop)
        cut = False  # whether the limit stopped us before the end of the file
        for _, text in records:
            chunk.append(text)
            if len(chunk) == _CHUNK:
                cut = flush()
                if limit.met(counts):
                    cut = cut or next(records, None) is not None  # met exactly at a chunk's end?
                    break
        else:
            if chunk:
                cut = flush()
    offsets = np.zeros(len(lengths) + 1, dtype=IDX_DTYPE)
    np.cumsum(lengths, out=offsets[1:])
    return write_shard(Path(job.root), job.stem, job.path, None, offsets, {"cut": cut})


def _trim(root: Path, record: dict, keep: int, dtype: np.dtype) -> dict:
    """Cut a finished shard to its first `keep` documents (where the split's limit falls)."""
    stem = record["name"]
    idx = np.fromfile(root / f"{stem}.idx", dtype=IDX_DTYPE)[: keep + 1].copy()
    tokens = np.fromfile(root / f"{stem}.bin", dtype=dtype, count=int(idx[-1]))
    return write_shard(root, stem, record["file"], tokens, idx, {"cut": True, "cut_from_documents": record["documents"]})


class _Progress:
    def __init__(self, enabled: bool, split: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=f"dlr-prepare {split}", unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _ShardMaker:
    """Hands out the finished record of shard k, k = 0, 1, ...: the one an earlier run left, or one
    tokenized now, in a pool of `num_proc` spawned processes or (num_proc=1) in this one.

    A pool is kept 2 files per process ahead of the shard asked for, skipping finished shards:
    enough that no process waits for its next file, few enough that little work past the split's
    limit is thrown away. Shard k is then either finished, in flight, or made here when asked for."""

    def __init__(self, jobs: list[ShardJob], root: Path, dtype: np.dtype, bar: _Progress) -> None:
        self.jobs, self.root, self.dtype, self.bar = jobs, root, dtype, bar
        self.pool: ProcessPoolExecutor | None = None
        self.manager: Any = None
        self.queue: Any = None
        self.futures: dict[int, Future] = {}
        self.next_submit = 0
        self.ahead = 0

    def start(self, num_proc: int) -> None:
        if num_proc > 1:
            ctx = multiprocessing.get_context("spawn")  # no forked copies of tokenizer threads or locks
            self.manager = ctx.Manager()
            self.queue = self.manager.Queue()
            self.pool = ProcessPoolExecutor(max_workers=num_proc, mp_context=ctx)
            self.ahead = 2 * num_proc

    def shard(self, k: int) -> dict:
        self._submit_ahead()
        future = self.futures.pop(k, None)
        if future is not None:
            return self._wait(future)
        record = finished_shard(self.root, self.jobs[k].stem, self.dtype)
        if record is not None:
            self.bar.update(record["tokens"])
            return record
        return tokenize_file(self.jobs[k], _Report(callback=self.bar.update))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.manager is not None:
            self.manager.shutdown()

    def _submit_ahead(self) -> None:
        while self.pool is not None and len(self.futures) < self.ahead and self.next_submit < len(self.jobs):
            j = self.next_submit
            self.next_submit += 1
            if finished_shard(self.root, self.jobs[j].stem, self.dtype) is None:
                self.futures[j] = self.pool.submit(tokenize_file, self.jobs[j], _Report(queue=self.queue))

    def _wait(self, future: Future) -> dict:
        # Waits in short slices so that the workers' token counts reach the bar while they work.
        while True:
            self._drain()
            try:
                record = future.result(timeout=0.2)
            except FutureTimeout:
                continue
            self._drain()
            return record

    def _drain(self) -> None:
        while not self.queue.empty():
            self.bar.update(self.queue.get())


def _take_until_limit(maker: _ShardMaker, limit: Limit) -> tuple[list[dict], np.ndarray, int | None]:
    """The shards of the split in file order up to the one where `limit` falls (trimmed there),
    their counts, and that shard's index (None when the files ran out first)."""
    counts = np.zeros(4, dtype=np.int64)
    shards: list[dict] = []
    for k, job in enumerate(maker.jobs):
        record = maker.shard(k)
        lengths = np.diff(np.fromfile(maker.root / f"{job.stem}.idx", dtype=IDX_DTYPE))
        keep = limit.keep(lengths, counts)
        if keep is not None and keep < record["documents"]:
            record = _trim(maker.root, record, keep, maker.dtype)
            lengths = lengths[:keep]
        counts += limit.counts(lengths)
        shards.append(record)
        if keep is not None:
            return shards, counts, k
    return shards, counts, None


def _prepare_split(spec: DataSpec, root: Path, split: str, parts: list[Part], limit: Limit, *, num_proc: int,
                   dtype: np.dtype, progress: bool) -> dict:
    files = [p.path for p in parts]
    jobs = [ShardJob(spec=spec, tokenizer_dir=str(root / TOKENIZER_DIR), path=p.path, root=str(root),
                     stem=shard_stem(split, k), limit=limit, threads=1 if num_proc > 1 else -1, start=p.start, stop=p.stop)
            for k, p in enumerate(parts)]
    bar = _Progress(progress, split)
    maker = _ShardMaker(jobs, root, dtype, bar)
    try:
        maker.start(num_proc)
        shards, counts, stopped_at = _take_until_limit(maker, limit)
    finally:
        maker.close()
        bar.close()
    if stopped_at is not None:
        for job in jobs[stopped_at + 1:]:  # speculative work past the limit, or an older run's
            remove_shard(root, job.stem)
    complete = stopped_at is None or (stopped_at == len(files) - 1 and not shards[-1].get("cut"))
    if counts[0] == 0:
        raise ConfigError(f"the {split} split has no documents (files: {', '.join(files[:3])})")
    return {"documents": int(counts[0]), "tokens": int(counts[1]), "complete": bool(complete), "shards": shards}


def _splits(spec: DataSpec) -> list[str]:
    if spec.source in ("hub", "mix") or spec.holdout is not None:
        return list(SPLITS)  # C4's layout gives both even without file globs; data.holdout makes validation
    return [s for s in SPLITS if (spec.train_files if s == "train" else spec.validation_files)]


def _dlr_version() -> str:
    try:
        from importlib.metadata import version

        return version("dlr")
    except Exception:
        return "unknown"


def _check_plan(root: Path, plan: dict, have: dict, what: str) -> None:
    diff = [k for k in PLAN_KEYS if have.get(k) != plan[k]]
    if diff:
        sub = []
        for k in diff:  # name the innermost differing field when there is one
            a, b = have.get(k), plan[k]
            if isinstance(a, dict) and isinstance(b, dict):
                sub += [f"{k}.{f}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
            else:
                sub.append(k)
        raise ConfigError(f"out={str(root)!r} holds {what} of other settings (differs in: {', '.join(sub)}); "
                          f"use another out, or delete it to start over")


def _check_request(spec: DataSpec, *, tokens: int | None, documents: int | None, num_proc: int) -> None:
    if spec.source == "tokens":
        raise ConfigError("data=tokens is already prepared; give dlr-prepare the data config it came from (c4, c4_local, c4_sample, text)")
    for key, value in (("tokens", tokens), ("documents", documents)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad_value(key, value, "an integer >= 1, or null for the whole train split")
    if tokens is not None and documents is not None:
        raise ConfigError(f"tokens={tokens} and documents={documents} both set; accepted: one of them (or neither)")
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise bad_value("num_proc", num_proc, "an integer >= 1")


def _out_root(out: str | os.PathLike) -> Path:
    """`out` as a directory path, refused while it holds anything but a (finished or unfinished) prepare."""
    root = Path(out).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out={str(root)!r} is a file; give a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / PLAN).is_file():
        raise ConfigError(f"out={str(root)!r} exists and is not a dlr-prepare directory; give a new or empty directory")
    check_writable(root, "out")
    return root


def _plan(spec: DataSpec, tokenizer: Tokenizer, files: dict[str, list[Part]], *, tokens: int | None,
          documents: int | None) -> dict:
    """Everything the shards depend on: a re-run continues or reuses `out` only when this is equal."""
    return {
        "source": _source_plan(spec),
        "files": {s: [p.path if (p.start, p.stop) == (0, None) else [p.path, p.start, p.stop] for p in parts]
                  for s, parts in files.items()},
        "tokenizer": {"name": spec.tokenizer, "class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "sha256": tokenizer_hash(tokenizer)},
        "dtype": dtype_for(tokenizer.vocab_size).name,
        "limits": {"tokens": tokens, "documents": documents, "val_tokens": spec.val_tokens, "val_seq_len": spec.seq_len},
    }


def _source_plan(spec: DataSpec) -> dict:
    if spec.source == "mix":  # the weights, the sources and the order's seed decide the shards
        return {"source": "mix", "seed": MIX_SEED, "exhausted": spec.exhausted,
                "mix": [{"name": n, "weight": w, **_source_plan(sub)} for n, w, sub in spec.mix]}
    return {"source": spec.source, "path": spec.path if spec.source == "hub" else None,
            "name": spec.name if spec.source == "hub" else None, "train_files": list(spec.train_files),
            "validation_files": list(spec.validation_files), "text_field": spec.text_field,
            "sample_by": spec.sample_by, **({"holdout": spec.holdout} if spec.holdout is not None else {})}


def _split_files(spec: DataSpec, split: str) -> list[Part]:
    """The split's files, each checked (a mixture: every source's, in the order of data.mix)."""
    subs = [sub for _, _, sub in spec.mix] if spec.source == "mix" else [spec]
    parts = []
    for sub in subs:
        for p in split_parts(sub, split):
            check_local_file(sub, p.path)
            parts.append(p)
    return parts


def _finished(root: Path, plan: dict, dtype: np.dtype) -> dict | None:
    """The manifest when `root` holds a finished prepare of `plan` with intact shards, else None
    (after removing damaged shards, so that this run redoes just them). Refuses another plan's work."""
    if (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text())
        _check_plan(root, plan, manifest, "a finished prepare")
        damaged = [sh["name"] for sp in manifest["splits"].values() for sh in sp["shards"]
                   if check_shard_files(root, sh["name"], sh["documents"], sh["tokens"], dtype, full=False) is not None]
        if not damaged:
            log.info("%s is already prepared (%s); nothing to do", root, _summary(manifest))
            return manifest
        log.warning("%d damaged shard(s) in %s (%s); redoing them", len(damaged), root, ", ".join(damaged[:3]))
        for stem in damaged:
            remove_shard(root, stem)
        (root / MANIFEST).unlink()
    elif (root / PLAN).is_file():
        _check_plan(root, plan, json.loads((root / PLAN).read_text()), "an unfinished prepare")
        log.info("resuming the unfinished prepare in %s", root)
    return None


def _save_tokenizer(root: Path, tokenizer: Tokenizer, spec: DataSpec, sha256: str) -> None:
    """Save the tokenizer beside the shards (via a temporary name), and check that it loads back as
    the same tokenizer, so that `data=tokens` never decodes with another one."""
    if not (root / TOKENIZER_DIR).is_dir():
        tmp = root / (TOKENIZER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save(tmp)
        os.replace(tmp, root / TOKENIZER_DIR)
    saved = load_tokenizer(str(root / TOKENIZER_DIR))
    if tokenizer_hash(saved) != sha256:
        raise ConfigError(f"the tokenizer saved in {str(root / TOKENIZER_DIR)!r} differs from data.tokenizer={spec.tokenizer!r}; delete out and start over")


def prepare(spec: DataSpec, out: str | os.PathLike, *, tokens: int | None = None, documents: int | None = None,
            num_proc: int = 1, progress: bool = True) -> dict:
    """Tokenize `spec`'s splits into `out`; returns the manifest (also when it was already done)."""
    _check_request(spec, tokens=tokens, documents=documents, num_proc=num_proc)
    root = _out_root(out)
    tokenizer = load_tokenizer(spec.tokenizer)
    splits = _splits(spec)
    files = {s: _split_files(spec, s) for s in splits}
    limits = {"train": Limit(documents=documents, tokens=tokens),
              "validation": Limit(val_tokens=spec.val_tokens, seq_len=spec.seq_len)}
    dtype = dtype_for(tokenizer.vocab_size)
    plan = _plan(spec, tokenizer, files, tokens=tokens, documents=documents)
    manifest = _finished(root, plan, dtype)
    if manifest is not None:
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / PLAN, plan)
    _save_tokenizer(root, tokenizer, spec, plan["tokenizer"]["sha256"])

    t0 = time.perf_counter()
    if spec.source == "mix":
        out_splits = {"train": prepare_mix_train(spec, root, tokenizer, limits["train"], dtype, MIX_SEED),
                      "validation": prepare_mix_validation(spec, root, tokenizer, dtype)}
    else:
        out_splits = {s: _prepare_split(spec, root, s, files[s], limits[s], num_proc=num_proc, dtype=dtype,
                                        progress=progress) for s in splits}
    for tmp in root.glob("*.tmp"):
        tmp.unlink()
    if spec.source == "mix":  # the weights and what each source gave, beside the plan's sources
        plan = {**plan, "mix": {"weights": {n: w for n, w, _ in spec.mix},
                                "train_tokens": out_splits["train"].pop("source_tokens"),
                                "validation": out_splits["validation"].pop("mix")}}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, **plan, "splits": out_splits,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dlr_version": _dlr_version(),
                "num_proc": num_proc, "seconds": round(time.perf_counter() - t0, 2)}
    write_json(root / MANIFEST, manifest)
    log.info("prepared %s: %s", root, _summary(manifest))
    return manifest


def _summary(manifest: dict) -> str:
    return "; ".join(f"{s}: {v['documents']:,} documents, {v['tokens']:,} tokens{'' if v['complete'] else ' (cut)'}"
                     for s, v in manifest["splits"].items())
