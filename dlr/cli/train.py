"""`dlr-train model=llama_130m rank=256`: the command line of dlr.train.loop.train.

A single run's settings are composed and validated once (`from_overrides`) and that typed
config is what the trainer gets. A multirun (`-m method=lowrank,dlr seed=0,1`) and Hydra's
own flags (--cfg, --info, ...) go through `@hydra.main`; before Hydra starts a multirun, every
sweep combination is composed and validated, so a typo or a bad value is one line and exit
code 2 before the first job starts.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import sys
import tempfile

import hydra
from omegaconf import DictConfig

import dlr.configs  # noqa: F401  (registers the schemas and the run-dir resolver)
from dlr.config import TrainConfig

from ._common import USAGE_FLAGS, canonical_overrides, from_overrides, guarded, parse_overrides, quiet_third_party, typed

PROG = "dlr-train"
MAX_CHECKED_COMBINATIONS = 256


def _run(cfg: TrainConfig) -> int:
    from ..train.loop import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun / accelerate launch the summary is printed once, by rank 0
    if cfg.system.dry_run:
        print(json.dumps(result, indent=2))
    elif result.get("already_finished"):
        print(f"{PROG}: {cfg.checkpoint.out_dir} has finished; nothing changed (its summary.json):", file=sys.stderr)
        print(json.dumps({k: v for k, v in result.items() if k != "already_finished"}, indent=2))
    else:
        print(json.dumps({k: result[k] for k in ("val_ppl", "val_loss", "tokens", "wall_s") if k in result}
                         | {k: result[k] for k in ("folded_val_ppl",) if k in result}))
    return 0


def _log_setup() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@hydra.main(config_path="pkg://dlr.configs", config_name="train", version_base="1.3")
def _main(raw: DictConfig) -> None:
    """One job of a multirun (or of Hydra's own flags): the config Hydra's sweeper composed, validated."""
    _log_setup()
    code = guarded(PROG, lambda: _run(typed("train", raw)))
    if code:
        sys.exit(code)


def _single(args: list[str]) -> int:
    cfg = from_overrides("train", args)  # composed and validated here, once
    _log_setup()
    return _run(cfg)


def combinations(args: list[str]) -> list[list[str]]:
    """The override lists of every job a (multi)run starts: sweeps expanded, as Hydra's basic sweeper does."""
    choices = []
    for o in parse_overrides(args):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.islice(itertools.product(*choices), MAX_CHECKED_COMBINATIONS)]


def precheck(argv: list[str]) -> None:
    """Compose and validate every job's config; ConfigError on the first bad one."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags):
        return  # Hydra's own flags (--cfg, --info, -cn ...): Hydra handles them
    overrides = [a for a in argv if not a.startswith("-")]
    for combo in combinations(overrides):
        from_overrides("train", combo)


def _help() -> int:
    from dlr.config.help import command_help

    print(command_help("train"))
    return 0


def _multirun() -> None:
    """Hydra's sweeper writes multirun.yaml into its sweep directory; that goes to a temporary
    one, removed after the sweep, so a multirun writes nothing but its run directories."""
    sweep_dir = tempfile.mkdtemp(prefix="dlr-multirun-")
    sys.argv.append(f"hydra.sweep.dir={sweep_dir}")
    try:
        _main()
    finally:
        shutil.rmtree(sweep_dir, ignore_errors=True)


def main() -> None:
    args = sys.argv[1:]
    quiet_third_party()
    if any(a in USAGE_FLAGS for a in args):
        sys.exit(guarded(PROG, _help))
    if not any(a.startswith("-") for a in args):
        code = guarded(PROG, _single, args)
        if code:
            sys.exit(code)
        return
    code = guarded(PROG, lambda: precheck(args) or 0)
    if code:
        sys.exit(code)
    # Hydra reads sys.argv itself: hand it the settings' full keys (`rank=8` -> `factorization.rank=8`).
    sys.argv[1:] = [a if a.startswith("-") else canonical_overrides("train", [a])[0] for a in args]
    if any(a in ("-m", "--multirun") for a in args) and not any(a.startswith("hydra.sweep.dir=") for a in args):
        _multirun()
    else:
        _main()


if __name__ == "__main__":
    main()
