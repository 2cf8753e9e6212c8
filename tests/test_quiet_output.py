"""A command's output carries dlr's lines, not third-party noise: the real dlr-train and dlr-eval,
run as a user runs them, print no `datasets` "Generating train split" bars, no lm_eval progress
bars and no "fatal: not a git repository" from lm_eval's `git describe`."""
import os
import re
import subprocess
import sys

import pytest

# A tqdm bar: "  40%|####      | 4/10 [00:01<00:02,  2.5it/s]" (segments split on \r and \n).
BAR = re.compile(r"%\||it/s\]|s/it\]")
# dlr's own bar (dlr-train has no switch for it); dlr-eval's is turned off with progress=false.
DLR_BARS = ("train:",)


def _env(tmp_path):
    # A fresh datasets cache: "Generating train split" shows the first time a file is read.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}


def _noise(text: str) -> list[str]:
    segments = [s.strip() for s in re.split(r"[\r\n]", text) if s.strip()]
    return [s for s in segments if ("Generating" in s and "split" in s) or "fatal: not a git repository" in s
            or (BAR.search(s) and not s.startswith(DLR_BARS))]


def test_noise_is_what_the_check_finds():
    bars = "Generating train split: 136 examples [00:00, 28511.29 examples/s]\r  0%|          | 0/4 [00:00<?, ?it/s]"
    assert len(_noise(bars + "\nfatal: not a git repository (or any of the parent directories): .git")) == 3
    assert _noise("train: 100%|##########| 2/2 [00:02<00:00,  1.30s/it]\nstep 2: val_loss 10.18\n") == []


@pytest.mark.slow
def test_dlr_train_and_dlr_eval_print_no_third_party_noise(tmp_path):
    env, out = _env(tmp_path), tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "dlr.cli.train", "model=llama_tiny", "data=c4_sample", "steps=2",
                            "global_batch=8", "micro_batch=8", "eval_every=2", f"out_dir={out}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "val_loss" in train.stdout and _noise(train.stdout + train.stderr) == []
    # The perplexity (datasets streaming the sample) and an lm_eval task (lm_eval loads its data
    # with datasets) in one command; progress=false turns off dlr's own eval bar.
    ev = subprocess.run([sys.executable, "-m", "dlr.cli.evaluate", f"ckpt={out / 'final'}", "data=c4_sample",
                         "eval_tokens=2000", "tasks=c4_cloze", "limit=4", "batch_size=4", "progress=false"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "c4_cloze: acc=" in ev.stdout and "val_ppl" in ev.stdout
    assert _noise(ev.stdout + ev.stderr) == []
