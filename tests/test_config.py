"""dlr.config: every setting declared once, typed objects built from overrides, one-line refusals,
--help from the declarations without torch."""
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dlr.config import (COMMAND_SCHEMAS, SHORT_SECTIONS, FactorizationConfig, TrainConfig, from_overrides,
                        all_keys, runtime_keys, short_names)
from dlr.model import sizes as zoo
from dlr.config.help import command_help
from dlr.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=llama_tiny", "data=c4_sample"]


def test_overrides_become_typed_nested_sections():
    cfg = from_overrides("train", [*TINY, "rank=8", "alpha=0.5", "steps=7", "out_dir=x", "precision=fp32",
                                   "wandb.project=p", "optimizer=spectron"])
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.factorization, FactorizationConfig)
    assert (cfg.factorization.rank, cfg.factorization.alpha, cfg.schedule.steps) == (8, 0.5, 7)
    assert (cfg.checkpoint.out_dir, cfg.system.precision, cfg.logging.wandb.project) == ("x", "fp32", "p")
    assert type(cfg.optimizer).__name__ == "SpectronConfig"
    assert type(cfg.data).__name__ == "DataConfig" and cfg.model.name == "llama_tiny"
    # The long form names the same setting.
    assert from_overrides("train", [*TINY, "factorization.rank=8"]) == from_overrides("train", [*TINY, "rank=8"])


def test_short_keys_work_inside_interpolations():
    cfg = from_overrides("train", [*TINY, "method=lowrank", "out_dir=runs/${method}-s${seed}-r${rank}"])
    assert cfg.checkpoint.out_dir == f"runs/lowrank-s0-r{cfg.model.default_rank}"


def test_defaults_follow_the_model_recipe_and_name_the_run_dir():
    cfg = from_overrides("train", ["model=llama_tiny", "method=lowrank", "seed=3"])
    assert cfg.factorization.rank == cfg.model.default_rank
    recipe = zoo.recipe("llama_tiny")
    assert (cfg.schedule.steps, cfg.schedule.lr, cfg.schedule.global_batch, cfg.schedule.micro_batch) == \
        (recipe["steps"], recipe["lr"], recipe["global_batch"], recipe["micro_batch"])
    assert cfg.checkpoint.out_dir == f"runs/llama_tiny-lowrank-r{cfg.model.default_rank}-s3"


def test_each_recipe_value_has_one_key():
    """The size's recipe is the schedule's defaults: one key each (lr=, steps=, global_batch=, micro_batch=),
    which a size change moves and an override replaces; no model.lr or optimizer.lr beside it."""
    keys = all_keys("train")
    for leaf in ("lr", "steps", "global_batch", "micro_batch"):
        assert [k for k in keys if k.rpartition(".")[2] == leaf] == [f"schedule.{leaf}"]
    big = from_overrides("train", ["model=llama_60m"])
    assert (big.schedule.lr, big.schedule.steps) == (zoo.recipe("llama_60m")["lr"], zoo.recipe("llama_60m")["steps"])
    mine = from_overrides("train", ["model=llama_60m", "lr=0.01", "steps=5", "optimizer=spectron"])
    assert (mine.schedule.lr, mine.schedule.steps, mine.schedule.micro_batch) == (0.01, 5, 128)
    help_rows = [line.split()[0] for line in command_help("train").splitlines() if line.startswith("  ")]
    assert help_rows.count("lr") == 1 and "model.lr" not in help_rows and "optimizer.lr" not in help_rows
    for bad, hint in (("model.lr=0.1", "unknown setting 'model.lr'"), ("optimizer.lr=0.1", "unknown setting 'optimizer.lr'")):
        with pytest.raises(ConfigError, match=hint):
            from_overrides("train", [*TINY, bad])


def test_short_names_are_unique_across_sections():
    for command, sections in SHORT_SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(COMMAND_SCHEMAS[command])}
        names = [g.name for s in sections for g in dataclasses.fields(fields[s].metadata["section"])]
        assert len(names) == len(set(names)), command
        assert not set(names) & set(fields), "a short name must not shadow a top-level key"
        assert len(short_names(command)) == len(names)


@pytest.mark.parametrize("override,message", [
    ("lrr=0.1", "unknown setting 'lrr'; did you mean 'lr'?"),
    ("+lrr=0.1", "unknown setting 'lrr'; did you mean 'lr'?"),
    ("factorization.rnk=3", "did you mean 'factorization.rank'?"),
    ("model.hidden_sizee=3", "did you mean 'model.hidden_size'?"),
    ("wandb.projct=x", "did you mean 'wandb.project'?"),
    ("method=foo", "method='foo' is not valid; accepted: full, lowrank, dlr"),
    ("lr=1e38", "lr=1e+38 is not valid"),
    ("lr=1e31", "lr=1e+31 is not valid"),
    ("alpha=1e39", "alpha=1e+39 is not valid"),
    ("grad_clip=1e39", "grad_clip=1e+39 is not valid"),
    ("rank=abc", "rank='abc' is not valid"),
    ("dry_run=yes", "dry_run='yes' is not valid; accepted: true, false"),
    ("fuse_latents=true", "unknown setting 'fuse_latents'"),
])
def test_bad_overrides_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        from_overrides("train", [*TINY, override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_runtime_is_an_attribute_of_the_setting():
    keys = runtime_keys(TrainConfig)
    assert {"checkpoint.out_dir", "schedule.micro_batch", "system.compile", "data.num_workers"} <= keys
    assert not keys & {"factorization.rank", "schedule.lr", "seed", "schedule.steps"}


def test_config_package_imports_nothing_else_from_dlr():
    for path in (ROOT / "dlr" / "config").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("dlr"):
                assert node.module in ("dlr.errors",), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("dlr") for a in node.names), path.name


HELP_PROBE = """
import runpy, sys
sys.argv = [{prog!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
assert "torch" not in sys.modules, "printing help imported torch"
"""


@pytest.mark.parametrize("command,module", [("train", "dlr.cli.train"), ("eval", "dlr.cli.evaluate"),
                                            ("fold", "dlr.cli.fold"), ("prepare", "dlr.cli.prepare"),
                                            ("finetune", "dlr.cli.finetune"), ("quantize", "dlr.cli.quantize")])
def test_help_lists_the_commands_own_settings_without_torch(command, module):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE.format(prog=f"dlr-{command}", module=module)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "_schema" not in text  # no Hydra internals
    names = [f.name for f in dataclasses.fields(COMMAND_SCHEMAS[command])
             if not f.metadata.get("section") and not f.metadata.get("group")]
    for name in names:
        assert f"\n  {name} " in text, name
    if command == "train":
        for name in short_names("train"):
            assert f"\n  {name} " in text or f"\n  {name}." in text, name
        assert "model=" in text and "llama_tiny" in text
