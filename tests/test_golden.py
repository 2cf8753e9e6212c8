"""The golden fixed-seed run: code may move, the numbers and tensors may not.

tests/golden/dlr_tiny.json was recorded (tests/golden_record.py) from this exact command
before the package was reorganised; the same command must give bitwise the same metrics
and the same tensors in final/ and folded/.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from golden_record import record

GOLDEN = Path(__file__).parent / "golden" / "dlr_tiny.json"
COMMAND = ("model=llama_tiny method=dlr rank=8 data=c4_sample steps=6 eval_every=3 save_every=3 "
           "global_batch=16 micro_batch=8 log_every=1 seed=0").split()


def test_golden_run_is_bitwise_unchanged(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    if golden["torch"] != torch.__version__:
        pytest.skip(f"recorded with torch {golden['torch']}; this is {torch.__version__} (kernels may differ)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "dlr.cli.train", *COMMAND], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = record(tmp_path / "runs" / "llama_tiny-dlr-r8-a1-s0")
    assert got["metrics"] == golden["metrics"]
    assert got["final"] == golden["final"]
    assert got["folded"] == golden["folded"]
