"""Training batches: shard the global document order over processes and DataLoader workers,
tokenize, build `paper` (truncate/pad) or `packed` (EOS-joined windows) batches, and resume exactly.

Sharding over processes follows `datasets.distributed.split_dataset_by_node`. When the number
of train files is divisible by num_processes (always for one process), each epoch's permuted file
order is dealt out to the processes (process p reads positions i % num_processes == p), so a
process downloads and parses only 1/num_processes of the data. Otherwise every process reads the
whole globally shuffled stream and keeps document g when g % num_processes == process_index; only then is the
union of a global step over N processes the set of documents of one process with N times the
batch. `split_mode` names which applies; it is part of the resume fingerprint.

Within a process, local document L goes to worker (L // batch_size) % num_workers: each worker
builds whole batches from consecutive local documents, and the DataLoader's round-robin hands
them out in order, so in paper mode the batches do not depend on the number of workers. The
price is that every worker parses its process's whole stream (it tokenizes only its own).

Resume. Each batch carries its worker's position *after* that batch. The main process keeps
the latest one per worker plus the number of batches consumed; a restored loader starts each
worker from its saved position, rotating workers so the round-robin continues where it was.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dlr.data.mixture import MixStream
from dlr.data.sources import check_local_file, split_parts
from dlr.data.spec import DataSpec, check_process, saved_config
from dlr.data.stream import POSITION_KEYS, DocStream
from dlr.data.tokenizer import Tokenizer
from dlr.errors import ConfigError

if TYPE_CHECKING:
    from dlr.data.token_batches import TokenBatches

STATE_VERSION = 2


def split_mode(num_files: int, num_processes: int) -> str:
    """'files' when the files can be dealt out evenly over the processes, else 'documents'."""
    return "files" if num_files > 0 and num_files % num_processes == 0 else "documents"


def paper_batch(ids: list[list[int]], seq_len: int, pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """GaLore/CoLA protocol: text + EOS, truncated (EOS kept last) or right-padded; -100 on pads."""
    x = np.full((len(ids), seq_len), pad_id, dtype=np.int64)
    y = np.full((len(ids), seq_len), -100, dtype=np.int64)
    for i, seq in enumerate(ids):
        seq = seq[: seq_len - 1]
        n = len(seq)
        x[i, :n] = seq
        x[i, n] = eos_id
        y[i, : n + 1] = x[i, : n + 1]
    return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y)}


class _TrainIterable(torch.utils.data.IterableDataset):
    """Yields batches (with their `_state`) for the logical workers given per DataLoader slot."""

    def __init__(self, stream: DocStream, tokenizer: Tokenizer, *, batch_size: int, process_index: int,
                 num_processes: int, num_logical: int, logical: list[int], starts: list[dict | None]) -> None:
        # process_index/num_processes split the stream's documents; (0, 1) when the stream is
        # already this process's file shard.
        self.stream, self.tok = stream, tokenizer
        self.B, self.T = batch_size, stream.spec.seq_len
        self.packed = stream.spec.mode == "packed"
        self.process_index, self.num_processes = process_index, num_processes
        self.K, self.logical, self.starts = num_logical, logical, starts
        self.num_sources = len(stream.names) if hasattr(stream, "names") else 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else info.id
        if info is not None:
            # One tokenizer thread per worker: the workers are the parallelism.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            if hasattr(self.tok, "num_threads"):
                self.tok.num_threads = 1
        try:
            yield from self._batches(self.logical[slot], self.starts[slot])
        except ConfigError as e:
            # A worker's exception reaches the main process wrapped in a multi-line traceback;
            # pass the one-line message through instead.
            yield {"_error": str(e)}

    def _batches(self, w: int, start: dict | None) -> Iterator[dict[str, Any]]:
        B, T, K = self.B, self.T, self.K
        cursor = self.stream.cursor(saved_position(start), self.process_index, self.num_processes)
        local = start["local"] if start else 0
        leftover = start["leftover"] if start else []
        buf: list[int] = leftover.tolist() if isinstance(leftover, torch.Tensor) else list(leftover)
        tokens = list(start.get("tokens") or [0] * self.num_sources) if start else [0] * self.num_sources
        eos, pad = self.tok.eos_id, self.tok.pad_id
        pending: list[str] = []
        sources: list[int] = []

        def state() -> dict[str, Any]:
            return {"pos": cursor.position(), "local": local, "leftover": list(buf), "worker": w, "tokens": list(tokens)}

        for g, text, src in cursor:
            if g % self.num_processes != self.process_index:
                continue
            L, local = local, local + 1
            if (L // B) % K != w:
                continue
            pending.append(text)
            sources.append(src)
            if len(pending) < B:
                continue
            ids = self.tok.encode_batch(pending)
            for seq, s in zip(ids, sources):  # what each source contributed: the tokens of its rows
                tokens[s] += len(seq) + 1 if self.packed else min(len(seq), T - 1) + 1
            pending, sources = [], []
            if not self.packed:
                yield {**paper_batch(ids, T, pad, eos), "_state": state()}
                continue
            for seq in ids:
                buf.extend(seq)
                buf.append(eos)
            while len(buf) >= B * T:
                x = torch.tensor(buf[: B * T], dtype=torch.long).view(B, T)
                buf = buf[B * T:]
                yield {"input_ids": x, "labels": x.clone(), "_state": state()}


def saved_position(state: dict | None) -> list[int] | None:
    """A worker state's stream position; states written before mixtures hold its five keys."""
    if not state:
        return None
    if "pos" in state:
        return [int(x) for x in state["pos"]]
    return [int(state[k]) for k in POSITION_KEYS]


_FROM_TOKENS = ("cannot resume: the checkpoint's data state comes from token shards (data=tokens), this run streams "
                "its data; resume with the data config that wrote it")


class TrainBatches:
    """Endless iterator of {"input_ids", "labels"} LongTensor[B, T] batches for one process.

    `state_dict()` between two `next()` calls captures the data position; `load_state_dict`
    makes the following batches equal those of the uninterrupted stream.
    """

    def __init__(self, spec: DataSpec, tokenizer: Tokenizer, batch_size: int, process_index: int, num_processes: int,
                 seed: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is not valid; accepted: an integer >= 1")
        check_process(process_index, num_processes)
        self.spec, self.tokenizer = spec, tokenizer
        self.batch_size, self.process_index, self.num_processes, self.seed = batch_size, process_index, num_processes, int(seed)
        if spec.source == "mix":
            # Every process reads every source and keeps g % num_processes == process_index of the
            # one mixture order.
            self.stream, self.split = MixStream(spec, seed), "documents"
            self._doc_split = (process_index, num_processes)
        else:
            self._single_stream(spec, process_index, num_processes, seed)
        self.num_workers = spec.num_workers
        self._K = max(1, spec.num_workers)
        self._worker_states: list[dict | None] = [None] * self._K
        self._n = 0
        self._it: Iterator[dict[str, Any]] | None = None

    def _single_stream(self, spec: DataSpec, process_index: int, num_processes: int, seed: int) -> None:
        files = split_parts(spec, "train")
        for f in files:
            check_local_file(spec, f.path)
        self.split = split_mode(len(files), num_processes)
        if self.split == "files":
            self.stream = DocStream(spec, files, seed, shard=process_index, num_shards=num_processes)
            self._doc_split = (0, 1)
        else:
            self.stream = DocStream(spec, files, seed)
            self._doc_split = (process_index, num_processes)

    @property
    def source_names(self) -> list[str]:
        """The names under which `source_tokens` counts: the mixture's sources, or the one source."""
        if isinstance(self.stream, MixStream):
            return list(self.stream.names)
        s = self.spec
        if s.source == "hub":
            return [f"{s.path}/{s.name}" if s.name else str(s.path)]
        return [s.train_files[0] if s.train_files else s.source]  # the first path or glob: what it read

    def source_tokens(self) -> list[int]:
        """Tokens this process has taken from each source (label tokens of its rows), in `source_names` order."""
        total = [0] * len(self.source_names)
        for st in self._worker_states:
            for i, n in enumerate((st or {}).get("tokens") or []):
                total[i] += int(n)
        return total

    def _fingerprint(self) -> dict[str, Any]:
        s = self.spec
        return {"seq_len": s.seq_len, "mode": s.mode, "shuffle_buffer": s.shuffle_buffer, "num_workers": s.num_workers,
                "batch_size": self.batch_size, "process_index": self.process_index, "num_processes": self.num_processes,
                "seed": self.seed,
                "num_files": len(self.stream.files), "split": self.split, "tokenizer_vocab": self.tokenizer.vocab_size,
                **({"holdout": s.holdout} if s.holdout is not None else {}),
                **({"sources": [[n, w] for n, w, _ in s.mix], "exhausted": s.exhausted} if s.mix else {})}

    def _start(self) -> None:
        first = self._n % self._K
        logical = [(first + i) % self._K for i in range(self._K)]
        starts = [self._worker_states[w] for w in logical]
        ds = _TrainIterable(self.stream, self.tokenizer, batch_size=self.batch_size, process_index=self._doc_split[0],
                            num_processes=self._doc_split[1], num_logical=self._K, logical=logical, starts=starts)
        if self.num_workers == 0:
            self._it = iter(ds)
        else:
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=4)
            self._it = iter(loader)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start()
        batch = next(self._it)  # type: ignore[arg-type]
        if "_error" in batch:
            self.close()
            raise ConfigError(batch["_error"])
        st = batch.pop("_state")
        self._worker_states[st["worker"]] = st
        self._n += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """This process's position, plain JSON-able python; `load_state_dict` needs the same processes."""
        return {"version": STATE_VERSION, "batches": self._n, "config": self._fingerprint(),
                "workers": copy.deepcopy(self._worker_states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == "tokens":
            raise ConfigError(_FROM_TOKENS)
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data state version={state.get('version')!r} is not valid; accepted: {STATE_VERSION}")
        mine = self._fingerprint()
        saved = saved_config(state["config"])
        # Split last: a changed num_processes or file count is the cause, and is named first.
        for k in sorted(saved, key=lambda k: k == "split"):
            v = saved[k]
            if k == "split" and v != self.split:
                raise ConfigError(
                    f"cannot resume the data stream: the train split is divided over processes by {self.split} now "
                    f"but by {v} in the checkpoint (positions are not comparable); resume with the code and settings "
                    f"that wrote it"
                )
            if mine.get(k) != v:
                raise ConfigError(
                    f"cannot resume the data stream: {k}={mine.get(k)!r} now but {v!r} in the checkpoint; use the same value"
                )
        self.close()
        self._worker_states = copy.deepcopy(list(state["workers"]))
        self._n = int(state["batches"])

    # ------------------------------------------------------------------ process-count-independent

    def local_position(self) -> list[int]:
        """The stream position just after the last batch handed out (zeros before the first),
        then this process's `source_tokens`: every process's, in `global_state`, is the run's."""
        st = self._worker_states[(self._n - 1) % self._K] if self._n else None
        pos = saved_position(st) or [0] * self.stream.position_size()
        return pos + self.source_tokens()

    def _portable_fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in self._fingerprint().items()
                if k not in ("process_index", "num_processes", "batch_size", "num_workers", "split")}

    def global_state(self, positions: list[list[int]]) -> dict[str, Any]:
        """The position of the whole run, from every process's `local_position` (in process order).

        In paper mode with documents dealt out by index (g % num_processes == process_index), the
        documents of a global step are a contiguous range of the global order whatever the
        number of processes, so "the first G documents of epoch e are consumed" says where the
        run is. Packed mode (per-process token buffers) and file shards (a per-process order)
        have no such position: `portable` is then False and only the same number of processes
        can resume.
        """
        W, P = self.num_processes, self.stream.position_size()
        tokens = [sum(int(p[P + i]) for p in positions) for i in range(len(positions[0]) - P)]
        positions = [list(p[:P]) for p in positions]
        portable = self.spec.mode == "paper" and (self.split == "documents" or W == 1)
        # (epoch, g) of a position; a mixture's has no epochs: its g counts from the start.
        key = (lambda p: (0, p[0])) if isinstance(self.stream, MixStream) else (lambda p: (p[0], p[4]))
        head = max(positions, key=key)
        epoch, G = key(head)
        # Every process's next document lies at or past G: nothing below G is still owed.
        portable = portable and all(key(p)[0] == epoch and key(p)[1] - 1 + W >= G for p in positions)
        position = head if isinstance(self.stream, MixStream) else dict(zip(POSITION_KEYS, head))
        return {"version": STATE_VERSION, "portable": portable, "processes": W, "position": position, "tokens": tokens,
                "config": self._portable_fingerprint()}

    def load_global_state(self, state: dict[str, Any]) -> None:
        """Continue the global document sequence at `state` with this run's processes and workers."""
        if state.get("kind") == "tokens":
            raise ConfigError(_FROM_TOKENS)
        mine = self._portable_fingerprint()
        for k, v in sorted(state.get("config", {}).items()):
            if mine.get(k) != v:
                raise ConfigError(
                    f"cannot resume the data stream: {k}={mine.get(k)!r} now but {v!r} in the checkpoint; use the same value"
                )
        saved = state.get("processes")
        if not state.get("portable"):
            why = ("data.mode='packed' packs per process" if state.get("config", {}).get("mode") == "packed"
                   else "its train files were split by file")
            raise ConfigError(
                f"the checkpoint's data position belongs to its {saved} processes ({why}); accepted: resume with "
                f"{saved} processes (a run on another count needs data.mode=paper and a file count it does not divide)"
            )
        if self.spec.mode != "paper" or (self.split == "files" and self.num_processes > 1):
            raise ConfigError(
                f"num_processes={self.num_processes} would split {len(self.stream.files)} train files by file, which cannot "
                f"continue a run written by {saved} processes; accepted: a process count that does not divide "
                f"the number of train files, or {saved} processes"
            )
        pos = state["position"]
        pos = [int(pos[k]) for k in POSITION_KEYS] if isinstance(pos, dict) else [int(x) for x in pos]
        tokens = state.get("tokens") or []
        self.close()
        # Every worker starts at the global position; each process takes g % num_processes ==
        # process_index from there, so a global step is again the next global_batch documents. The
        # run's token counts so far continue in process 0's first worker.
        self._worker_states = [{"pos": pos, "local": 0, "leftover": [], "worker": w,
                                "tokens": list(tokens) if (self.process_index, w) == (0, 0) else [0] * len(tokens)}
                               for w in range(self._K)]
        self._n = 0

    def restore(self, process_state: dict[str, Any] | None, global_state: dict[str, Any]) -> None:
        """This process's own position when it still applies (exact, any mode); else the global one."""
        if process_state is not None and saved_config(process_state.get("config") or {}) == self._fingerprint():
            self.load_state_dict(process_state)
        elif process_state is not None and not global_state.get("portable"):
            self.load_state_dict(process_state)  # raises the precise one-line mismatch
        else:
            self.load_global_state(global_state)

    def close(self) -> None:
        """Stop workers (a new iterator starts lazily on the next `next()`)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def train_batches(spec: DataSpec, tokenizer: Tokenizer, batch_size: int, process_index: int,
                  num_processes: int, seed: int) -> "TrainBatches | TokenBatches":
    """This process's endless training batches: streamed and tokenized on the fly, or (data=tokens)
    read from `dlr-prepare` shards. Both have state_dict / load_state_dict / close."""
    if spec.source == "tokens":
        from dlr.data.token_batches import TokenBatches

        return TokenBatches(spec, tokenizer, batch_size, process_index, num_processes, seed)
    return TrainBatches(spec, tokenizer, batch_size, process_index, num_processes, seed)
