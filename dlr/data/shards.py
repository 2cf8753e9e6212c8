"""Token shards written by `dlr-prepare`: the on-disk format and a memory-mapped reader.

    DIR/manifest.json        source, tokenizer (+ sha256), dtype, documents/tokens per split and
                             per shard, creation time, dlr version. Written last: its presence
                             means the prepare finished.
    DIR/tokenizer/           the tokenizer itself (`load_tokenizer(DIR/tokenizer)`)
    DIR/<split>-NNNNN.bin    token ids of the documents of input file NNNNN, concatenated, no EOS
                             (uint16 while the vocabulary fits, else uint32; little-endian)
    DIR/<split>-NNNNN.idx    int64[documents + 1]: document i is bin[idx[i]:idx[i+1]]
    DIR/<split>-NNNNN.json   the shard's own record, written after its .bin/.idx (resume marker)

Documents keep their boundaries; EOS (and padding) is added by the batching code exactly as the
streaming path adds it, so both give the same rows. Global document d of a split is document
d - first(d's shard) of its shard, shards in input-file order.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dlr.errors import ConfigError

FORMAT = "dlr-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
IDX_DTYPE = np.dtype("<i8")


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_stem(split: str, k: int) -> str:
    return f"{split}-{k:05d}"


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.path={str(root)!r} holds no {MANIFEST}; write it with: dlr-prepare data=<data config> out={root}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(path)!r} is not a readable dlr-prepare manifest ({type(e).__name__}); re-run dlr-prepare") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a dlr-prepare manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{str(path)!r}: shard format version={manifest.get('version')!r} is not valid; accepted: {FORMAT_VERSION} (re-run dlr-prepare)")
    return manifest


def _offsets_rise(idx: np.ndarray, chunk: int = 1 << 22) -> bool:
    """Every offset >= the one before it, read in chunks (memory stays small for a large split)."""
    return not any(bool((np.diff(idx[a:a + chunk + 1]) < 0).any()) for a in range(0, max(len(idx) - 1, 0), chunk))


def check_shard_files(root: Path, stem: str, documents: int, tokens: int, dtype: np.dtype, full: bool = True) -> str | None:
    """None if the shard's .bin/.idx have the sizes its record promises, else why not (one line).
    `full` also reads every offset: from 0, never falling, to the last token, so every document
    lies inside the .bin (8 bytes per document: a training start of a large split reads them
    once; only a resume scan of dlr-prepare checks sizes and ends alone)."""
    bin_path, idx_path = root / f"{stem}.bin", root / f"{stem}.idx"
    for p, want in ((bin_path, tokens * dtype.itemsize), (idx_path, (documents + 1) * IDX_DTYPE.itemsize)):
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return f"token shard {str(p)!r} is missing"
        if size != want:
            return f"token shard {str(p)!r} is truncated or damaged: {size} bytes, the manifest says {want}"
    idx = np.memmap(idx_path, dtype=IDX_DTYPE, mode="r")
    if int(idx[0]) != 0 or int(idx[-1]) != tokens or (full and documents and not _offsets_rise(idx)):
        return f"token shard index {str(idx_path)!r} is damaged (offsets do not run from 0 to {tokens})"
    return None


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    # np.memmap refuses empty files; an input file with no documents gives an empty shard.
    # A plain ndarray over the mapping: indexing it skips np.memmap's Python-level __getitem__.
    return np.asarray(np.memmap(path, dtype=dtype, mode="r")) if n else np.zeros(0, dtype=dtype)


class SplitShards:
    """All documents of one split, memory-mapped, addressed by global document id (vectorized)."""

    def __init__(self, root: str | os.PathLike, split: str, manifest: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        manifest = manifest if manifest is not None else read_manifest(self.root)
        splits = manifest.get("splits", {})
        if split not in splits:
            have = ", ".join(sorted(splits)) or "none"
            raise ConfigError(
                f"data.path={str(self.root)!r} has no {split} split (it holds: {have}); prepare it with "
                f"dlr-prepare data=<config with data.{split}_files> out=<dir>"
            )
        entry = splits[split]
        self.split, self.complete = split, bool(entry.get("complete", False))
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        # Ids at or past it would index past the embedding: a damaged .bin, refused where it is read.
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        self.bins: list[np.ndarray] = []
        self.idxs: list[np.ndarray] = []
        docs, toks = [0], [0]
        for shard in entry["shards"]:
            n, t = int(shard["documents"]), int(shard["tokens"])
            if n == 0:
                continue
            problem = check_shard_files(self.root, shard["name"], n, t, self.dtype)
            if problem:
                raise ConfigError(f"{problem}; re-run the same dlr-prepare command to rewrite it")
            self.bins.append(_memmap(self.root / f"{shard['name']}.bin", self.dtype, t))
            self.idxs.append(_memmap(self.root / f"{shard['name']}.idx", IDX_DTYPE, n + 1))
            docs.append(docs[-1] + n)
            toks.append(toks[-1] + t)
        self.doc_cum = np.asarray(docs, dtype=np.int64)
        self.tok_cum = np.asarray(toks, dtype=np.int64)
        self.num_docs, self.num_tokens = int(self.doc_cum[-1]), int(self.tok_cum[-1])
        if self.num_docs != int(entry["documents"]) or self.num_tokens != int(entry["tokens"]):
            raise ConfigError(f"{str(self.root / MANIFEST)!r}: the {split} shards hold {self.num_docs} documents / "
                              f"{self.num_tokens} tokens, the manifest says {entry['documents']} / {entry['tokens']}")

    def doc_bounds(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global token start, length) of each document id in `docs`."""
        docs = np.asarray(docs, dtype=np.int64)
        shard = np.searchsorted(self.doc_cum, docs, side="right") - 1
        start, length = np.empty_like(docs), np.empty_like(docs)
        for s in _groups(shard):
            sel = shard == s if len(self.idxs) > 1 else slice(None)
            local = docs[sel] - self.doc_cum[s]
            idx = self.idxs[s]
            a = np.asarray(idx[local], dtype=np.int64)
            start[sel] = a + self.tok_cum[s]
            length[sel] = np.asarray(idx[local + 1], dtype=np.int64) - a
        return start, length

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """Token ids (int64) at global token positions `pos` (reads only those pages)."""
        pos = np.asarray(pos, dtype=np.int64)
        if len(self.bins) == 1:
            return self._in_vocab(self.bins[0][pos].astype(np.int64))
        shard = np.searchsorted(self.tok_cum, pos, side="right") - 1
        out = np.empty(pos.shape, dtype=np.int64)
        for s in _groups(shard):
            sel = shard == s
            out[sel] = self.bins[s][pos[sel] - self.tok_cum[s]]
        return self._in_vocab(out)

    def _in_vocab(self, ids: np.ndarray) -> np.ndarray:
        # One max over the ids a batch reads: cheap next to the forward pass it feeds.
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ConfigError(f"the {self.split} token shards of data.path={str(self.root)!r} hold token id "
                              f"{int(ids.max())}, outside the tokenizer's {self.vocab_size} ids (damaged .bin); "
                              "re-run the same dlr-prepare command into a new out to rewrite them")
        return ids

    def iter_documents(self):
        """Every document in order, as a list of ids (what the validation set is built from)."""
        for b, idx in zip(self.bins, self.idxs):
            offsets = np.asarray(idx)
            tokens = self._in_vocab(np.asarray(b))
            for i in range(len(offsets) - 1):
                yield tokens[offsets[i]:offsets[i + 1]].tolist()


def _groups(labels: np.ndarray) -> list[int]:
    if labels.size == 0:
        return []
    lo, hi = int(labels.min()), int(labels.max())
    return [lo] if lo == hi else [int(v) for v in np.unique(labels)]
