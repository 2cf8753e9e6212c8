"""The global, deterministic document order of a split, for a given seed and epoch.

Why not `IterableDataset.shuffle` + `state_dict`: datasets documents that the shuffle buffer is
lost on resume, so a restored run would not see the same documents. Instead we shuffle in
*blocks*: per epoch the file order is permuted, the stream is cut into blocks of
`shuffle_buffer` documents, and each block is permuted with a generator seeded by
(seed, epoch, block). A position is then just (epoch, block, where the block starts, index);
resuming re-reads one block, so it is exact and cheap.

With `num_processes > 1` a stream can be one process's *file shard*: the epoch's permuted file
order is dealt out round-robin (process p gets positions i % num_processes == p) and the process
reads only those files; block and record positions then index the process's own list. The
permutation is global (seeded like the unsharded one), so the processes of one epoch together
cover every file exactly once and a one-process shard is the unsharded stream.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from dlr.data.sources import Part, iter_part
from dlr.data.spec import DataSpec
from dlr.errors import ConfigError

log = logging.getLogger(__name__)

_NO_SHUFFLE_BLOCK = 1024  # block size used only to bound memory when shuffling is off
_FILES, _BLOCKS = 1, 2  # stream ids for the seed sequence


@dataclass
class Position:
    """Where the epoch stream is: block `block` starts at record `rec` of the `file`-th file in
    this epoch's order; `g` is the next global document index (within the epoch) to hand out."""

    epoch: int = 0
    block: int = 0
    file: int = 0
    rec: int = 0
    g: int = 0


class DocStream:
    """The documents of `files` (all of them, or file shard `shard` of `num_shards`) per epoch."""

    def __init__(self, spec: DataSpec, files: list[str] | list[Part], seed: int, shard: int = 0,
                 num_shards: int = 1) -> None:
        if not (0 <= shard < num_shards):
            raise ValueError(f"shard={shard} is not in [0, {num_shards})")
        self.spec = spec
        self.parts = [f if isinstance(f, Part) else Part(f) for f in files]
        self.files = [p.path for p in self.parts]
        self.seed = int(seed) % (2**63)
        self.shard, self.num_shards = shard, num_shards
        self.shuffle = spec.shuffle_buffer > 0
        self.block_size = spec.shuffle_buffer if self.shuffle else _NO_SHUFFLE_BLOCK

    def cursor(self, position: list[int] | None, process_index: int = 0, num_processes: int = 1) -> "DocCursor":
        """Read from `position` (a `DocCursor.position()`, None = the start) on, endlessly."""
        return DocCursor(self, position, process_index, num_processes)

    def position_size(self) -> int:
        return len(POSITION_KEYS)

    def file_order(self, epoch: int) -> list[int]:
        """Indices into `files` that this stream reads in `epoch`, in reading order."""
        if not self.shuffle or len(self.files) < 2:
            order = list(range(len(self.files)))
        else:
            order = [int(i) for i in np.random.default_rng([self.seed, epoch, _FILES]).permutation(len(self.files))]
        return order[self.shard::self.num_shards]

    def _records(self, order: list[int], file: int, rec: int) -> Iterator[tuple[int, int, str]]:
        for i in range(file, len(order)):
            for r, text in iter_part(self.spec, self.parts[order[i]], start=rec if i == file else 0):
                yield i, r, text

    def iter_epoch(self, pos: Position) -> Iterator[tuple[int, str, int, int, int]]:
        """Yield (g, text, block, block_file, block_rec) for g >= pos.g until the epoch ends; g counts
        the documents of this stream (of this shard, when sharded) from the start of the epoch."""
        order = self.file_order(pos.epoch)
        records = self._records(order, pos.file, pos.rec)
        k, size = pos.block, self.block_size
        while True:
            block: list[str] = []
            start = (0, 0)
            for i, r, text in records:
                if not block:
                    start = (i, r)
                block.append(text)
                if len(block) == size:
                    break
            if not block:
                return
            if self.shuffle:
                perm = np.random.default_rng([self.seed, pos.epoch, _BLOCKS, k]).permutation(len(block))
            else:
                perm = np.arange(len(block))
            for j in range(len(block)):
                g = k * size + j
                if g >= pos.g:
                    yield g, block[perm[j]], k, start[0], start[1]
            if len(block) < size:
                return
            k += 1


def _names(files: list[str], n: int = 3) -> str:
    shown = ", ".join(files[:n])
    return shown + (f", ... ({len(files)} files)" if len(files) > n else "")


POSITION_KEYS = ("epoch", "block", "file", "rec", "g")


class DocCursor:
    """A stream's documents from a position on, epoch after epoch: (g, text, source 0).

    `position()` is where the next document comes from. process_index/num_processes only check
    that every process gets a document of each epoch (the caller keeps g % num_processes ==
    process_index).
    `on_epoch_end(epoch, documents)` is called when an epoch has been read whole.
    """

    def __init__(self, stream: DocStream, position: list[int] | None, process_index: int = 0, num_processes: int = 1,
                 on_epoch_end: Callable[[int, int], None] | None = None) -> None:
        self.stream, self.process_index, self.num_processes = stream, process_index, num_processes
        self.pos = Position(*position) if position else Position()
        self.on_epoch_end = on_epoch_end

    def position(self) -> list[int]:
        p = self.pos
        return [p.epoch, p.block, p.file, p.rec, p.g]

    def __iter__(self) -> Iterator[tuple[int, str, int]]:
        pos = self.pos
        while True:
            fresh_epoch, seen, mine = pos.g == 0, 0, 0
            for g, text, k, bf, br in self.stream.iter_epoch(pos):
                seen += 1
                mine += g % self.num_processes == self.process_index
                pos.block, pos.file, pos.rec, pos.g = k, bf, br, g + 1
                yield g, text, 0
            self._check_epoch(fresh_epoch, seen, mine)
            if self.on_epoch_end is not None:
                self.on_epoch_end(pos.epoch, pos.g)
            self.pos = pos = Position(epoch=pos.epoch + 1)

    def _check_epoch(self, fresh_epoch: bool, seen: int, mine: int) -> None:
        st = self.stream
        if fresh_epoch and seen == 0:
            if st.num_shards == 1:
                raise ConfigError(f"the train split has no documents (files: {_names(st.files)})")
            mine_files = [st.files[i] for i in st.file_order(self.pos.epoch)]
            raise ConfigError(
                f"process_index={st.shard} of num_processes={st.num_shards} got train files with no documents in epoch "
                f"{self.pos.epoch} ({_names(mine_files)}); every process needs a non-empty file"
            )
        if fresh_epoch and mine == 0:
            raise ConfigError(
                f"the train split has {seen} documents, fewer than num_processes={self.num_processes}; every process needs one"
            )

