"""parallelism=fsdp2 through dlr-train on 2 CPU processes, and resume on another process count."""
import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_train import cli, records

TORCHRUN2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dlr.cli.train")
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def accelerate2(config: str) -> tuple[str, ...]:
    """`accelerate launch` of the shipped config with 2 processes. On a machine without GPUs its
    MULTI_GPU launcher is torch.distributed.run, and dlr-train's Accelerator(cpu=True) takes gloo
    (`--cpu` would pick accelerate's simple launcher: one process, or MPI with a hostfile). A free
    port, not 29500 (tests may run side by side; `--main_process_port 0` needs accelerate >= 1.7)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
            "--num_processes", "2", "--main_process_port", str(port), "-m", "dlr.cli.train")
# fp32 on CPU: a sharded run sums gradients and losses in another order than one process does.
REL = 1e-5


def _cut_at(run, step):
    """What a SIGKILL right after checkpoint `step` leaves (later checkpoints and outputs gone)."""
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    for name in ("final", "folded", "summary.json"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


COMMON = ["steps=6", "save_every=2", "eval_every=6", "method=dlr", "global_batch=8", "keep_last=3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """parallelism=fsdp2 on 2 processes under torchrun, uninterrupted: the reference run."""
    out = tmp_path_factory.mktemp("fsdp2") / "straight"
    cli(*COMMON, "micro_batch=2", "parallelism=fsdp2", f"out_dir={out}", launcher=TORCHRUN2)
    return out


@pytest.mark.slow
def test_fsdp2_trains_folds_and_resumes_2_to_1_to_2_processes(tmp_path, straight):
    one = tmp_path / "one"  # the same global batches on one process, DDP path: the reference
    cli(*COMMON, "micro_batch=4", f"out_dir={one}")
    assert _max_rel(records(straight), records(one)) < REL
    summary = json.loads((straight / "summary.json").read_text())
    reference = json.loads((one / "summary.json").read_text())
    assert summary["val_ppl"] == pytest.approx(reference["val_ppl"], rel=REL)
    assert summary["folded_val_ppl"] == pytest.approx(summary["val_ppl"], rel=1e-6)  # the fold is exact when sharded
    # Written from the shards in the single-process layout (the writer's bytes are checked in
    # test_fsdp2.py; the weights themselves differ in the last bits, which AdamW's normalisation
    # of near-zero gradients magnifies, so they are not compared value by value here).
    for name in ("final", "folded"):
        got, want = load_file(straight / name / "model.safetensors"), load_file(one / name / "model.safetensors")
        assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
        assert (straight / name / "config.json").read_text() == (one / name / "config.json").read_text()
    assert not any(k.endswith("dlr_index") for k in load_file(straight / "folded" / "model.safetensors"))

    # 2 processes -> "killed" after step 2 -> resume with 1 (with activation checkpointing) ->
    # "killed" after step 4 -> resume with 2.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    saved = resumed / "config.yaml"  # a copied run names its old out_dir
    saved.write_text(saved.read_text().replace(str(straight), str(resumed)))
    _cut_at(resumed, 2)
    cli(*COMMON, "micro_batch=4", "parallelism=fsdp2", "gradient_checkpointing=true", f"out_dir={resumed}")
    assert json.loads((resumed / "checkpoints" / "step_6" / "trainer_state.json").read_text())["processes"] == 1
    _cut_at(resumed, 4)
    cli(*COMMON, "micro_batch=2", "parallelism=fsdp2", f"out_dir={resumed}", launcher=TORCHRUN2)
    got, want = records(resumed), records(straight)
    assert list(got) == [1, 2, 3, 4, 5, 6]
    print(f"max relative loss difference: fsdp2 x2 vs ddp x1 {_max_rel(records(straight), records(one)):.2e}, "
          f"resumed 2->1->2 vs uninterrupted {_max_rel(got, want):.2e}")
    assert _max_rel(got, want) < REL
    assert records(resumed, "lr") == records(straight, "lr")
    final = json.loads((resumed / "summary.json").read_text())
    assert final["folded_val_ppl"] == pytest.approx(summary["folded_val_ppl"], rel=REL)


@pytest.mark.slow
def test_accelerate_launch_runs_fsdp2_like_torchrun(tmp_path, straight):
    out = tmp_path / "accelerate"
    cli(*COMMON, "micro_batch=2", "parallelism=fsdp2", f"out_dir={out}", launcher=accelerate2("fsdp2.yaml"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["parallelism"] == "fsdp2"
    assert json.loads((out / "checkpoints" / "step_6" / "trainer_state.json").read_text())["processes"] == 2
    got, want = records(out), records(straight)
    print(f"max relative loss difference, accelerate launch vs torchrun (fsdp2 x2): {_max_rel(got, want):.2e}")
    assert list(got) == [1, 2, 3, 4, 5, 6] and _max_rel(got, want) < REL
    reference = json.loads((straight / "summary.json").read_text())
    assert summary["folded_val_ppl"] == pytest.approx(reference["folded_val_ppl"], rel=REL)
