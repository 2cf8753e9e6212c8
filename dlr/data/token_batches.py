"""Training batches from token shards (`data=tokens data.path=DIR`): memory-mapped, prefetched.

Order. The documents of the train split (in prepare order, ids 0..D-1) are cut into blocks of
`shuffle_buffer` consecutive documents. Each epoch permutes the blocks with (seed, epoch) and the
documents within each block with (seed, epoch, block): the same kind of block shuffle as the
streaming path, but over all blocks of the split, not within files. Epochs follow each other
into one endless global sequence of documents, independent of the number of processes.

Sharding over processes, both modes independent of `num_processes`:
- `paper`: global document G goes to process G % num_processes; local batch n of a process holds its
  local documents n*B..n*B+B-1. The documents of global step s over N processes are exactly those
  of one process with N times the batch.
- `packed`: the global sequence, EOS after each document, is one token stream cut into windows of
  `seq_len`; window k goes to process k % num_processes. The windows of a global step are again those
  of one process with N times the batch.
A process reads only its own documents/windows (and the small per-block index), from memory-mapped
files, so N processes read the data once between them.

Batch n of a process is a pure function of n, so the data state is one integer: resume is exact.
And since local batch n of process r holds global items (n*B + j)*W + r (documents in paper mode,
windows in packed mode), after n local batches per process the run has consumed exactly the
first n*B*W global items, whatever W: `global_state` records that count, and a run on another
number of processes (or micro-batch) continues at local batch items / (B*W) (`restore`).
Batches are built in a background thread `prefetch` batches ahead, so reading the shards never sits
in the training step's critical path: next() takes a ready batch (figures in benchmarks/README.md,
"Data loader"). A thread, not a DataLoader worker process: a worker hands every batch over through
inter-process communication, which costs more than the thread's short numpy work; the thread polls
for room in the queue instead of being woken by get(), which would make it take the GIL just as
next() returns to the step.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from dlr.data.shards import SplitShards, read_manifest
from dlr.data.spec import DataSpec, check_process, saved_config
from dlr.data.tokenizer import Tokenizer, tokenizer_hash
from dlr.errors import ConfigError

STATE_KIND = "tokens"
STATE_VERSION = 1
_NO_SHUFFLE_BLOCK = 1 << 16  # block size when shuffling is off (bounds the per-block arrays only)
_BLOCK_ORDER, _IN_BLOCK = 1, 2  # stream ids for the seed sequence
_BLOCK_CACHE = 8
_POLL_S = 0.002  # how often a prefetch thread with a full queue looks for room


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, root: str) -> None:
    """One line when the run's tokenizer is not the one the shards were written with."""
    want = manifest["tokenizer"]
    got = tokenizer_hash(tokenizer)
    if got != want["sha256"]:
        raise ConfigError(
            f"tokenizer mismatch: data.path={root!r} was prepared with tokenizer {want['name']!r} ({want['vocab_size']} "
            f"tokens, sha256 {want['sha256'][:12]}) but this run uses {tokenizer!r} (sha256 {got[:12]}); use "
            f"data.tokenizer=null (the one saved with the shards) or re-run dlr-prepare with this tokenizer"
        )


class _Block:
    __slots__ = ("docs", "start", "lens", "cum")

    def __init__(self, docs: np.ndarray, start: np.ndarray | None, lens: np.ndarray | None) -> None:
        self.docs, self.start, self.lens = docs, start, lens
        # cum[i]: offset of document i's first token in the block's EOS-joined stream.
        self.cum = None if lens is None else np.concatenate(([0], np.cumsum(lens + 1)))


class DocOrder:
    """The seeded global order of a split's documents (and, for packing, of its token stream)."""

    def __init__(self, shards: SplitShards, seed: int, shuffle_buffer: int, packed: bool) -> None:
        self.shards, self.seed, self.packed = shards, int(seed) % (2**63), packed
        self.D = shards.num_docs
        self.shuffle = shuffle_buffer > 0
        self.C = min(shuffle_buffer if self.shuffle else _NO_SHUFFLE_BLOCK, self.D)
        self.n_blocks = -(-self.D // self.C)
        self.sizes = np.full(self.n_blocks, self.C, dtype=np.int64)
        self.sizes[-1] = self.D - self.C * (self.n_blocks - 1)
        if packed:
            # Tokens (plus one EOS per document) of each block, from the boundary documents' offsets.
            first = np.arange(self.n_blocks, dtype=np.int64) * self.C
            start, _ = shards.doc_bounds(first)
            ends = np.append(start[1:], shards.num_tokens)
            self.block_tokens = ends - start + self.sizes
            self.E = shards.num_tokens + self.D  # tokens of one epoch's stream
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], _Block] = OrderedDict()

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(block order, first global position of each, first token position of each) in epoch e."""
        if e not in self._epochs:
            if self.shuffle and self.n_blocks > 1:
                perm = np.random.default_rng([self.seed, e, _BLOCK_ORDER]).permutation(self.n_blocks)
            else:
                perm = np.arange(self.n_blocks)
            doc_start = np.concatenate(([0], np.cumsum(self.sizes[perm])))
            tok_start = np.concatenate(([0], np.cumsum(self.block_tokens[perm]))) if self.packed else None
            self._epochs[e] = (perm, doc_start, tok_start)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _block(self, e: int, b: int) -> _Block:
        key = (e, b)
        blk = self._blocks.get(key)
        if blk is None:
            size = int(self.sizes[b])
            inner = (np.random.default_rng([self.seed, e, _IN_BLOCK, b]).permutation(size) if self.shuffle
                     else np.arange(size))
            docs = b * self.C + inner
            start = lens = None
            if self.packed:
                start, lens = self.shards.doc_bounds(docs)
            blk = self._blocks[key] = _Block(docs, start, lens)
            while len(self._blocks) > _BLOCK_CACHE:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return blk

    def docs(self, G: np.ndarray) -> np.ndarray:
        """Document ids at global positions G (epoch * D + position within the epoch)."""
        out = np.empty_like(G)
        epoch = G // self.D
        for e, sel in _runs(epoch):
            perm, doc_start, _ = self._epoch(e)
            g = G[sel] - e * self.D
            pos = np.searchsorted(doc_start, g, side="right") - 1
            res = np.empty_like(g)
            for p, sel2 in _runs(pos):
                res[sel2] = self._block(e, int(perm[p])).docs[g[sel2] - doc_start[p]]
            out[sel] = res
        return out

    def tokens(self, P: np.ndarray, eos: int) -> np.ndarray:
        """Token ids at positions P (sorted) of the endless EOS-joined stream of the global order."""
        e0, e1 = int(P[0] // self.E), int(P[-1] // self.E)
        if e0 == e1:  # the usual case: skip the per-position division
            return self._epoch_tokens(e0, P - e0 * self.E, eos)
        out = np.empty_like(P)
        for e, sel in _runs(P // self.E):
            out[sel] = self._epoch_tokens(e, P[sel] - e * self.E, eos)
        return out

    def _epoch_tokens(self, e: int, q: np.ndarray, eos: int) -> np.ndarray:
        perm, _, tok_start = self._epoch(e)
        p0 = int(np.searchsorted(tok_start, q[0], side="right")) - 1
        p1 = int(np.searchsorted(tok_start, q[-1], side="right")) - 1
        if p0 == p1:
            return self._block_tokens(self._block(e, int(perm[p0])), q - tok_start[p0], eos)
        out = np.empty_like(q)
        for p, sel in _runs(np.searchsorted(tok_start, q, side="right") - 1):
            out[sel] = self._block_tokens(self._block(e, int(perm[p])), q[sel] - tok_start[p], eos)
        return out

    def _block_tokens(self, blk: _Block, r: np.ndarray, eos: int) -> np.ndarray:
        i = np.searchsorted(blk.cum, r, side="right") - 1
        off = r - blk.cum[i]
        # An EOS slot (off == length) points one past its document: clamp it into range, read
        # whatever is there, and overwrite it (cheaper than boolean-mask indexing).
        t = self.shards.gather(np.minimum(blk.start[i] + off, self.shards.num_tokens - 1))
        t[off == blk.lens[i]] = eos
        return t


def _runs(labels: np.ndarray):
    """(value, selector) for each distinct value of a non-decreasing array (batches are sorted runs)."""
    if labels.size == 0:
        return
    if labels[0] == labels[-1]:
        yield int(labels[0]), slice(None)
        return
    cuts = np.flatnonzero(np.diff(labels)) + 1
    bounds = np.concatenate(([0], cuts, [labels.size]))
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield int(labels[a]), slice(int(a), int(b))


_STOP = object()
_FROM_STREAMING = ("cannot resume: the checkpoint's data state comes from a streaming data config, this run reads "
                   "token shards (data=tokens); resume with the data config that wrote it")


class TokenBatches:
    """Endless {"input_ids", "labels"} LongTensor[B, T] batches of one process, from token shards.

    Same interface as `TrainBatches`: `state_dict()` between two `next()` calls, `load_state_dict`,
    `close()`, and the process-count-independent `local_position`, `global_state`, `restore`.
    """

    def __init__(self, spec: DataSpec, tokenizer: Tokenizer, batch_size: int, process_index: int, num_processes: int,
                 seed: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is not valid; accepted: an integer >= 1")
        check_process(process_index, num_processes)
        manifest = read_manifest(spec.path)
        check_tokenizer(manifest, tokenizer, spec.path)
        self.spec, self.tokenizer = spec, tokenizer
        self.batch_size, self.process_index, self.num_processes, self.seed = batch_size, process_index, num_processes, int(seed)
        self.shards = SplitShards(spec.path, "train", manifest)
        if self.shards.num_docs == 0:
            raise ConfigError(f"the train split of data.path={spec.path!r} has no documents")
        self.packed = spec.mode == "packed"
        self.order = DocOrder(self.shards, seed, spec.shuffle_buffer, self.packed)
        self._hash = manifest["tokenizer"]["sha256"]
        self.prefetch = spec.prefetch
        self._pin = torch.cuda.is_available()
        self._n = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        """Local batch number n of this process (a pure function of n)."""
        B, T, W = self.batch_size, self.spec.seq_len, self.num_processes
        local = np.arange(n * B, (n + 1) * B, dtype=np.int64)
        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        if self.packed:
            windows = local * W + self.process_index
            P = (windows[:, None] * T + np.arange(T, dtype=np.int64)).ravel()
            x = torch.from_numpy(self.order.tokens(P, eos).reshape(B, T))
            return {"input_ids": x, "labels": x.clone()}
        docs = self.order.docs(local * W + self.process_index)
        start, length = self.shards.doc_bounds(docs)
        n_tok = np.minimum(length, T - 1)  # the streaming path's seq[:T-1] + [EOS]
        cols = np.arange(T, dtype=np.int64)
        text = cols[None, :] < n_tok[:, None]
        x = np.full((B, T), pad, dtype=np.int64)
        x[text] = self.shards.gather((start[:, None] + cols[None, :])[text])
        x[np.arange(B), n_tok] = eos
        y = np.where(cols[None, :] <= n_tok[:, None], x, -100)
        return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y)}

    def _produce(self, n: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                b = self.batch(n)
                if self._pin:
                    b = {k: v.pin_memory() for k, v in b.items()}
                # Poll rather than block on the queue's condition: a blocked put() is woken by the
                # consumer's get() and would grab the GIL at the very moment next() returns to the
                # step, so next() would wait for a batch build after all.
                while q.full() and not stop.is_set():
                    time.sleep(_POLL_S)
                if stop.is_set():
                    return
                q.put((n, b))
                n += 1
        except BaseException as e:  # surfaced by next() in the consumer
            while q.full() and not stop.is_set():
                time.sleep(_POLL_S)
            if not stop.is_set():
                q.put((n, e))

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch == 0:
            b = self.batch(self._n)
        else:
            if self._thread is None:
                self._stop = threading.Event()
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._produce, args=(self._n, self._queue, self._stop),
                                                 name="dlr-token-prefetch", daemon=True)
                self._thread.start()
            n, b = self._queue.get()  # type: ignore[union-attr]
            if isinstance(b, BaseException):
                self.close()
                raise b
            assert n == self._n, (n, self._n)
        self._n += 1
        return b

    def _fingerprint(self) -> dict[str, Any]:
        s = self.spec
        return {"seq_len": s.seq_len, "mode": s.mode, "shuffle_buffer": s.shuffle_buffer, "batch_size": self.batch_size,
                "process_index": self.process_index, "num_processes": self.num_processes, "seed": self.seed,
                "documents": self.shards.num_docs,
                "tokens": self.shards.num_tokens, "tokenizer_sha256": self._hash}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": STATE_KIND, "version": STATE_VERSION, "batches": self._n, "config": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != STATE_KIND:
            raise ConfigError(_FROM_STREAMING)
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"token data state version={state.get('version')!r} is not valid; accepted: {STATE_VERSION}")
        mine = self._fingerprint()
        for k, v in saved_config(state["config"]).items():
            if mine.get(k) != v:
                raise ConfigError(f"cannot resume the data stream: {k}={mine.get(k)!r} now but {v!r} in the checkpoint; "
                                  f"use the same value")
        self.close()
        self._n = int(state["batches"])

    # ------------------------------------------------------------------ process-count-independent

    def local_position(self) -> list[int]:
        """[local batches handed out]: with every process's, `global_state` says where the run is."""
        return [self._n]

    def _portable_fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in self._fingerprint().items() if k not in ("process_index", "num_processes", "batch_size")}

    def global_state(self, positions: list[list[int]]) -> dict[str, Any]:
        """The whole run's position from every process's `local_position` (in process order): the
        number of global items (documents in paper mode, seq_len windows in packed mode) consumed.

        Processes step together, so each has handed out the same n batches, which between them
        are exactly global items 0..n*B*W-1 (module docstring). Counts that differ (not written
        by the trainer) have no such position: `portable` is then False.
        """
        counts = {int(p[0]) for p in positions}
        portable = len(counts) == 1
        items = counts.pop() * self.batch_size * self.num_processes if portable else None
        return {"kind": STATE_KIND, "version": STATE_VERSION, "portable": portable, "processes": self.num_processes,
                "items": items, "config": self._portable_fingerprint()}

    def load_global_state(self, state: dict[str, Any]) -> None:
        """Continue the global sequence of items at `state` with this run's processes and batch size."""
        saved = state.get("processes")
        if state.get("kind") != STATE_KIND:
            if "config" in state:
                raise ConfigError(_FROM_STREAMING)
            raise ConfigError(f"the checkpoint's token data state has no format version (found {state.get('version')!r}); "
                              f"accepted: version {STATE_VERSION}, as this dlr writes it")
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"token data state version={state.get('version')!r} is not valid; accepted: {STATE_VERSION}")
        mine = self._portable_fingerprint()
        for k, v in sorted(state["config"].items()):
            if mine.get(k) != v:
                raise ConfigError(f"cannot resume the data stream: {k}={mine.get(k)!r} now but {v!r} in the checkpoint; "
                                  f"use the same value")
        if not state.get("portable"):
            raise ConfigError(f"the checkpoint's data position belongs to its {saved} processes (they had read "
                              f"different numbers of batches); accepted: resume with {saved} processes")
        items, per_batch = int(state["items"]), self.batch_size * self.num_processes
        if items % per_batch:
            raise ConfigError(
                f"cannot resume the data stream: the checkpoint has consumed items={items} global "
                f"{'windows' if self.packed else 'documents'}, not a multiple of micro_batch*processes="
                f"{self.batch_size}*{self.num_processes}={per_batch}; accepted: the run's global_batch with a "
                f"micro_batch and process count whose product divides {items}"
            )
        self.close()
        self._n = items // per_batch

    def restore(self, process_state: dict[str, Any] | None, global_state: dict[str, Any]) -> None:
        """This process's own state when it still applies (same processes and batch size); else the global one."""
        if process_state is not None and (process_state.get("kind") != STATE_KIND
                                          or saved_config(process_state.get("config") or {}) == self._fingerprint()):
            self.load_state_dict(process_state)  # exact, or the one-line refusal of a streaming state
        else:
            self.load_global_state(global_state)

    def close(self) -> None:
        """Stop the prefetch thread (a new one starts lazily on the next `next()`)."""
        t, self._thread = self._thread, None
        if t is not None:
            self._stop.set()
            t.join()
        self._queue = None
