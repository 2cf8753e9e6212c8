"""The README's main command, shrunk: both methods train, dlr-eval reads the fold back, it agrees."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "model=llama_tiny", "steps=2", "global_batch=8", "micro_batch=8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # the demo exits non-zero if the fold disagrees
    assert "the folded DLR model has exactly the low-rank model's parameters: True" in proc.stdout
    for method in ("lowrank", "dlr"):
        assert (tmp_path / "runs" / "demo" / f"{method}-s0" / "summary.json").exists()
    assert (tmp_path / "runs" / "demo" / "dlr-s0" / "folded" / "model.safetensors").exists()
