"""FSDP2 (fully_shard) on 2 CPU processes: training, checkpoint save/restore, sharded fold, the model directory written from the shards."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp2_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"trainable_alpha": True, "trainable_latent_scale": True, "bias": True,
                                          "expand": "random_reuse"}],
                         ids=["default", "knobs"])
def test_fsdp2_sharded_dlr_trains_like_unsharded_and_resumes_exactly(tmp_path, options):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLR_TEST_MODEL_OPTIONS": json.dumps(options)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # Sharded on 2 processes == unsharded on the whole batch (fp32, up to reduction order).
    assert report["losses"] == pytest.approx(report["ref_losses"], rel=1e-5)
    assert report["param_diff_vs_unsharded"] < 1e-5
    # dlr.train.checkpoint_files's FSDP branch: full state dicts out, sharded state back in, exactly.
    assert report["loaded_diff"] == 0.0
    assert report["restored_next_loss"] == report["next_loss"]
    assert report["after_resume_diff"] == 0.0
    assert (report["data_state_rank"], report["scheduler_epoch"]) == (0, 2)
    # The fold on the shards, and model directories written from them, equal one process's bytes.
    trainable = options.get("trainable_alpha") or options.get("trainable_latent_scale")
    if not trainable:
        assert report["folded_layers"] == 14
    for name in ("final",) if trainable else ("final", "folded"):
        assert "model.safetensors.index.json" in report[f"{name}_files"], report[f"{name}_files"]
        assert report[f"{name}_identical"], name
