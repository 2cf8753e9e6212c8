"""Record (or recompute) the golden fixed-seed run's numbers and tensor hashes.

    python tests/golden_record.py RUN_DIR > tests/golden/dlr_tiny-<vendor>-<capability>.json

The record holds what must stay bitwise equal when code moves: every metrics.jsonl
record's losses, grad norms, learning rates and val / folded perplexities (wall-clock
fields left out), and the sha256 of every tensor in final/ and folded/; and the machine it
holds for (`machine()`): torch's CPU kernels take other code paths on another CPU vendor or
instruction set, and the last bits of a sum move with them (an AMD EPYC and an AVX-512 Intel
Xeon differ in the 8th digit of the first grad norm).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# Fields of a metrics record that measure the machine, not the run.
CLOCK_FIELDS = {"time", "tokens_per_s", "peak_mem_gib", "first_step_s", "mfu"}


def tensor_hashes(model_dir: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h = hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        out[name] = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{h}"
    return out


def machine() -> dict[str, str]:
    """What the bitwise numbers depend on besides the code: torch, the CPU's vendor, torch's CPU capability."""
    import torch

    vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("vendor_id")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    return {"torch": torch.__version__, "cpu_vendor": vendor, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def record(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    metrics = [{k: v for k, v in json.loads(line).items() if k not in CLOCK_FIELDS}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"metrics": metrics, "final": tensor_hashes(run_dir / "final"), "folded": tensor_hashes(run_dir / "folded")}


if __name__ == "__main__":
    print(json.dumps({**machine(), **record(sys.argv[1])}, indent=1, sort_keys=True))
