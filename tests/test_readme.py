"""The training commands README.md and docs/training.md show run as written.

The commands are read out of the Markdown, so the test fails when a document drifts from the
code. Every dlr-train command line (plain, torchrun, accelerate launch, a multirun) is checked
with `dry_run=true` for the number of processes it starts: its settings, the batch split
over its processes, the plan (fast, in process). The CPU-sized ones (data=c4_sample) are then
run for real, as written (slow: a minute or more each on 2 cores).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dlr.cli.train import combinations
from dlr.config import from_overrides

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "training.md")
# Placeholders a reader fills in (a directory of their own, elided arguments, shell variables).
PLACEHOLDER = re.compile(r"\.\.\.|\bDIR\b|/data/|\$")


def shell_lines(path: Path) -> list[str]:
    """The commands of a Markdown file's ```bash blocks: continuations joined, comments dropped."""
    out, block, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            block = line.strip() == "```bash" and not block
            continue
        if not block:
            continue
        text = pending + line.split("  #")[0].split(" # ")[0].rstrip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip() + " "
            continue
        pending = ""
        if text.strip() and not text.lstrip().startswith("#"):
            out.append(text.strip())
    return out


def train_command(line: str) -> tuple[int, list[str]] | None:
    """(processes, dlr-train arguments) of a training command line; None for other commands."""
    words = shlex.split(line)
    while "=" in words[0] and not words[0].startswith("-"):  # VAR=value before the command
        words = words[1:]
    if words[0] == "dlr-train":
        return 1, words[1:]
    if "-m" in words and words[words.index("-m") + 1] == "dlr.cli.train":
        launcher, args = words[:words.index("-m")], words[words.index("-m") + 2:]
        for flag in ("--nproc_per_node", "--num_processes"):
            if flag in launcher:
                return int(launcher[launcher.index(flag) + 1]), args
        config = next((launcher[i + 1] for i, w in enumerate(launcher) if w == "--config_file"), None)
        if config is not None:  # accelerate launch without --num_processes: the config file's
            import yaml

            return int(yaml.safe_load((ROOT / config).read_text())["num_processes"]), args
    return None


def documented(cpu_sized: bool) -> list:
    found = []
    for path in DOCS:
        for line in shell_lines(path):
            parsed = train_command(line)
            if parsed is None or PLACEHOLDER.search(line):
                continue
            nodes = re.search(r"--nnodes (\d+)", line)
            processes = parsed[0] * (int(nodes.group(1)) if nodes else 1)
            if not cpu_sized or "data=c4_sample" in parsed[1]:
                found.append(pytest.param(line, processes, parsed[1], id=f"{path.name}: {line}"))
    return found


def test_the_documents_show_cpu_sized_training_commands():
    ids = [p.id for p in documented(cpu_sized=True)]
    assert any(i.startswith("README.md: dlr-train model=llama_tiny data=c4_sample") for i in ids), ids
    assert any("README.md: OMP_NUM_THREADS=1 torchrun --nproc_per_node 2" in i for i in ids), ids


@pytest.mark.parametrize("line,processes,args", documented(cpu_sized=False))
def test_every_training_command_plans(line, processes, args, tmp_path, monkeypatch):
    """Settings, batch split over the command's processes and the plan, as `dry_run=true` makes them."""
    from dlr.train.loop import train

    monkeypatch.chdir(tmp_path)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    given = [int(a.partition("=")[2]) for a in overrides if a.startswith("plan_processes=")]
    processes = given[0] if given else processes
    planned = [] if given else [f"plan_processes={processes}"]
    for combo in combinations(overrides):
        plan = train(from_overrides("train", [*combo, "dry_run=true", *planned]))
        assert plan["processes"] == processes
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def _run(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    else:
        launch = [sys.executable]
    return subprocess.run([*launch, "-m", "dlr.cli.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("line,processes,args", documented(cpu_sized=True))
def test_cpu_sized_training_commands_run_as_written(line, processes, args, tmp_path):
    """The run, its run directory, and one summary line on stdout (from rank 0 only)."""
    if processes > 1 and "fsdp2" in " ".join(args):
        pytest.skip("the 2-process fsdp2 run is tests/test_train_fsdp2.py's")
    proc = _run(args, processes, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["val_ppl"] > 0, proc.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "summary.json").is_file() and (run / "final").is_dir() and (run / "folded").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


MEMORY_ROW = re.compile(r"^\| (llama_\w+), micro_batch (\d+), `parallelism=(\w+)`[^|]* \| ([\d.]+) GiB \|", re.M)


def test_the_memory_estimates_quoted_are_what_dry_run_prints(tmp_path, monkeypatch):
    """docs/training.md's estimate column, from the command it names (a GPU's bf16 compiled settings)."""
    from dlr.train.loop import train

    monkeypatch.chdir(tmp_path)
    rows = MEMORY_ROW.findall((ROOT / "docs" / "training.md").read_text())
    assert len(rows) >= 3, rows
    for model, micro, parallelism, quoted in rows:
        plan = train(from_overrides("train", [f"model={model}", f"micro_batch={micro}", f"parallelism={parallelism}",
                                              "precision=bf16", "compile=true", "dry_run=true"]))
        assert plan["memory_estimate_per_process_gib"]["total_gib"] == float(quoted), (model, parallelism)
