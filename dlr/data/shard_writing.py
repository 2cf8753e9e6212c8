"""Writing one token shard of dlr-prepare: where a split is cut (`Limit`), the crash-safe write
of a shard and its record, and which shards an earlier run finished. See dlr/data/shards.py for
the format; dlr/data/prepare.py (one shard per input file) and dlr/data/prepare_mix.py (a
mixture's own order) write through these.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlr.data.shards import check_shard_files


@dataclass(frozen=True)
class Limit:
    """Where a split is cut: after `documents` documents, after `tokens` tokens (whole documents), or
    once the validation rows hold `val_tokens` label tokens in both batching modes at `seq_len`."""

    documents: int | None = None
    tokens: int | None = None
    val_tokens: int | None = None
    seq_len: int = 256

    def keep(self, lengths: np.ndarray, before: np.ndarray) -> int | None:
        """How many of these documents (lengths) to keep for the limit to be met, given the
        counts `before` = [documents, tokens, packed tokens, paper tokens]; None = not met yet."""
        n = len(lengths)
        if self.met(before):
            return 0
        if self.documents is not None:
            need = self.documents - int(before[0])
            return max(need, 0) if need <= n else None
        if self.tokens is not None:
            i = int(np.searchsorted(np.cumsum(lengths) + before[1], self.tokens))
            return i + 1 if i < n else None
        if self.val_tokens is not None:
            packed = np.cumsum(lengths + 1) + before[2]
            paper = np.cumsum(np.minimum(lengths + 1, self.seq_len)) + before[3]
            i = max(int(np.searchsorted(packed, self.val_tokens)), int(np.searchsorted(paper, self.val_tokens)))
            return i + 1 if i < n else None
        return None

    def met(self, counts: np.ndarray) -> bool:
        if self.documents is not None:
            return counts[0] >= self.documents
        if self.tokens is not None:
            return counts[1] >= self.tokens
        if self.val_tokens is not None:
            return counts[2] >= self.val_tokens and counts[3] >= self.val_tokens
        return False

    def counts(self, lengths: np.ndarray) -> np.ndarray:
        return np.array([len(lengths), lengths.sum(), (lengths + 1).sum(), np.minimum(lengths + 1, self.seq_len).sum()],
                        dtype=np.int64)


def write_shard(root: Path, stem: str, source: str, tokens: np.ndarray | None, offsets: np.ndarray,
                 extra: dict | None = None) -> dict:
    """.bin (unless already at `<stem>.bin.tmp`: tokens=None) and .idx via temporary names, then the
    record: a shard with a record is complete."""
    for ext, arr in ((".bin", tokens), (".idx", offsets)):
        tmp = root / f"{stem}{ext}.tmp"
        if arr is not None:
            with open(tmp, "wb") as f:
                arr.tofile(f)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, root / f"{stem}{ext}")
    record = {"name": stem, "file": source, "documents": int(len(offsets) - 1), "tokens": int(offsets[-1]), **(extra or {})}
    write_json(root / f"{stem}.json", record)
    return record


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def finished_shard(root: Path, stem: str, dtype: np.dtype) -> dict | None:
    try:
        record = json.loads((root / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None
    if check_shard_files(root, stem, record["documents"], record["tokens"], dtype) is not None:
        return None  # damaged (e.g. a disk filled up): redo it
    return record


def remove_shard(root: Path, stem: str) -> None:
    for ext in (".json", ".bin", ".idx"):  # record first: without it the shard is not "done"
        (root / f"{stem}{ext}").unlink(missing_ok=True)
