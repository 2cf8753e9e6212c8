"""Throughput, model FLOPs utilisation and peak memory."""
from __future__ import annotations

import contextlib
import resource
import sys
import time

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device name substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no meaningful CPU peak; MFU is reported for known GPUs only
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)


class Throughput:
    """Training tokens/s from host clocks read only after a sync, evaluation and saves left out.

    Without per-step syncs the host runs ahead of the GPU, so one step's wall time means
    nothing; a window between two log points (each read after a sync) does. The first step of
    a process (compilation, warm-up) is timed once on its own and kept out of tokens/s.
    """

    def __init__(self, tokens_per_step: int, device: torch.device) -> None:
        self.tokens_per_step, self.device = tokens_per_step, device
        self.first_step_s: float | None = None
        self.timed_s, self.timed_steps = 0.0, 0
        self._timed_in_window = 0
        self._window_t0, self._excluded = time.perf_counter(), 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_done(self) -> bool:
        """Count a finished step; True for the first one, which is timed (after a sync) on its own."""
        if self.first_step_s is None:
            self._sync()
            now = time.perf_counter()
            self.first_step_s = now - self._window_t0 - self._excluded
            self._window_t0, self._excluded = now, 0.0
            return True
        self._timed_in_window += 1
        return False

    def window_tokens_per_s(self) -> float | None:
        """Tokens/s of the timed steps since the last window; syncs first."""
        self._sync()
        elapsed = time.perf_counter() - self._window_t0 - self._excluded
        if self._timed_in_window == 0 or elapsed <= 0:
            return None
        self.timed_s += elapsed
        self.timed_steps += self._timed_in_window
        return self._timed_in_window * self.tokens_per_step / elapsed

    def new_window(self) -> None:
        self._timed_in_window = 0
        self._window_t0, self._excluded = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, a save) is kept out of tokens/s."""
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._excluded += time.perf_counter() - t

    def mean_tokens_per_s(self) -> float | None:
        return self.timed_steps * self.tokens_per_step / self.timed_s if self.timed_s > 0 else None
