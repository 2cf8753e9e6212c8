"""Record (or recompute) the golden fixed-seed run's numbers and tensor hashes.

    python tests/golden_record.py RUN_DIR > tests/golden/dlr_tiny.json

The record holds what must stay bitwise equal when code moves: every metrics.jsonl
record's losses, grad norms, learning rates and val / folded perplexities (wall-clock
fields left out), and the sha256 of every tensor in final/ and folded/.
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


def record(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    metrics = [{k: v for k, v in json.loads(line).items() if k not in CLOCK_FIELDS}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"metrics": metrics, "final": tensor_hashes(run_dir / "final"), "folded": tensor_hashes(run_dir / "folded")}


if __name__ == "__main__":
    import torch

    print(json.dumps({"torch": torch.__version__, **record(sys.argv[1])}, indent=1, sort_keys=True))
