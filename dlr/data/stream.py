"""The global, deterministic document order of a split, for a given seed and epoch.

Why not `IterableDataset.shuffle` + `state_dict`: datasets documents that the shuffle buffer is
lost on resume, so a restored run would not see the same documents. Instead we shuffle in
*blocks*: per epoch the file order is permuted, the stream is cut into blocks of
`shuffle_buffer` documents, and each block is permuted with a generator seeded by
(seed, epoch, block). A position is then just (epoch, block, where the block starts, index);
resuming re-reads one block, so it is exact and cheap.

With `world_size > 1` a stream can be one rank's *file shard*: the epoch's permuted file order
is dealt out round-robin (rank r gets positions i % world_size == r) and the rank reads only
those files; block and record positions then index the rank's own list. The permutation is
global (seeded like the unsharded one), so the ranks of one epoch together cover every file
exactly once and a one-rank shard is the unsharded stream.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dlr.data.sources import iter_file
from dlr.data.spec import DataSpec

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

    def __init__(self, spec: DataSpec, files: list[str], seed: int, shard: int = 0, num_shards: int = 1) -> None:
        if not (0 <= shard < num_shards):
            raise ValueError(f"shard={shard} is not in [0, {num_shards})")
        self.spec = spec
        self.files = list(files)
        self.seed = int(seed) % (2**63)
        self.shard, self.num_shards = shard, num_shards
        self.shuffle = spec.shuffle_buffer > 0
        self.block_size = spec.shuffle_buffer if self.shuffle else _NO_SHUFFLE_BLOCK

    def file_order(self, epoch: int) -> list[int]:
        """Indices into `files` that this stream reads in `epoch`, in reading order."""
        if not self.shuffle or len(self.files) < 2:
            order = list(range(len(self.files)))
        else:
            order = [int(i) for i in np.random.default_rng([self.seed, epoch, _FILES]).permutation(len(self.files))]
        return order[self.shard::self.num_shards]

    def _records(self, order: list[int], file: int, rec: int) -> Iterator[tuple[int, int, str]]:
        for i in range(file, len(order)):
            for r, text in iter_file(self.spec, self.files[order[i]], start=rec if i == file else 0):
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
