"""A weighted mixture of document streams, deterministic given the seed.

Document g of the mixture comes from source c(g), drawn with the weights from a generator
seeded by (seed, chunk of g): a pure function of g, so the order depends on neither the number
of processes nor of workers. Source s hands out its own documents in its own order (a
`DocStream` of its files, seeded by (seed, s)), epoch after epoch. Processes take
g % num_processes == process_index of the one global sequence, as the single-source `documents` split does.

A position is [g, then each source's DocStream position]: what a resume needs, exact for a
process and, from the process that is furthest (it has read every document below g), for any
number of processes.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from dlr.data.sources import check_local_file, split_parts
from dlr.data.spec import DataSpec
from dlr.data.stream import DocCursor, DocStream
from dlr.errors import ConfigError

log = logging.getLogger(__name__)
_CHUNK = 4096  # mixture choices drawn per generator call
_MIX = 3  # stream id for the seed sequence (stream.py uses 1 and 2)


def source_seed(seed: int, s: int) -> int:
    """Source s's own seed: independent streams for the sources of one run."""
    return int(np.random.SeedSequence([int(seed) % (2**63), s]).generate_state(1, np.uint64)[0] % (2**63))


class MixStream:
    """The sources of `spec.mix` (name, weight, DataSpec), each a DocStream over its train split."""

    def __init__(self, spec: DataSpec, seed: int) -> None:
        self.spec = spec
        self.seed = int(seed) % (2**63)
        self.names = [n for n, _, _ in spec.mix]
        w = np.array([w for _, w, _ in spec.mix], dtype=np.float64)
        self.weights = w / w.sum()
        self.cum = np.cumsum(self.weights)
        self.streams = []
        for s, (_, _, sub) in enumerate(spec.mix):
            parts = split_parts(sub, "train")
            for p in parts:
                check_local_file(sub, p.path)
            self.streams.append(DocStream(sub, parts, source_seed(seed, s)))
        self.files = [f for st in self.streams for f in st.files]
        self._chunks: dict[int, np.ndarray] = {}

    def choices(self, chunk: int) -> np.ndarray:
        """The sources of mixture documents chunk * _CHUNK ... (chunk + 1) * _CHUNK - 1."""
        c = self._chunks.get(chunk)
        if c is None:
            u = np.random.default_rng([self.seed, _MIX, chunk]).random(_CHUNK)
            c = np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.cum) - 1)
            self._chunks = {chunk: c}
        return c

    def position_size(self) -> int:
        return 1 + 5 * len(self.streams)

    def cursor(self, position: list[int] | None, process_index: int = 0, num_processes: int = 1) -> "MixCursor":
        return MixCursor(self, position)


class MixCursor:
    """The mixture's documents from a position on: (g, text, source index)."""

    def __init__(self, mix: MixStream, position: list[int] | None) -> None:
        self.mix = mix
        self.g = int(position[0]) if position else 0
        subs = [position[1 + 5 * s: 6 + 5 * s] for s in range(len(mix.streams))] if position else [None] * len(mix.streams)
        self.cursors = [DocCursor(st, subs[s], on_epoch_end=self._ended(s)) for s, st in enumerate(mix.streams)]
        self._iters: list[Iterator[tuple[int, str, int]]] = [iter(c) for c in self.cursors]

    def _ended(self, s: int):
        name, exhausted = self.mix.names[s], self.mix.spec.exhausted

        def ended(epoch: int, documents: int) -> None:
            if exhausted == "stop":
                raise ConfigError(f"data source {name!r} has handed out all its {documents} documents (epoch {epoch}) "
                                  f"and data.exhausted=stop ends the run here; data.exhausted=cycle reads it again")
            log.warning("data source %r has handed out all its %d documents (epoch %d); data.exhausted=cycle: its "
                        "epoch %d starts, in a new order", name, documents, epoch, epoch + 1)
        return ended

    def position(self) -> list[int]:
        return [self.g] + [x for c in self.cursors for x in c.position()]

    def __iter__(self) -> Iterator[tuple[int, str, int]]:
        while True:
            s = int(self.mix.choices(self.g // _CHUNK)[self.g % _CHUNK])
            _, text, _ = next(self._iters[s])
            g, self.g = self.g, self.g + 1
            yield g, text, s
