"""`dlr-train model=llama_130m rank=256`: Hydra front end of dlr.train.loop.train."""
from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, bad_value
from ._common import group_options
from ..train.loop import TrainingDiverged, train
from ..train.rundir import run_name

OmegaConf.register_new_resolver("dlr_run_dir", lambda *parts: run_name(*parts), replace=True)
GROUPS = ("model", "data", "optimizer")


@hydra.main(config_path="pkg://dlr.configs", config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train(cfg)
    except (ConfigError, TrainingDiverged) as err:
        print(f"dlr-train: error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 3)
    if cfg.dry_run:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps({k: result[k] for k in ("val_ppl", "val_loss", "tokens", "wall_s") if k in result}
                         | {k: result[k] for k in ("folded_val_ppl",) if k in result}))


def _check_group_choices(args: list[str]) -> None:
    """One-line errors for unknown config-group choices (Hydra's own message spans a page)."""
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in GROUPS:
            options = group_options(key)
            for choice in value.split(","):  # multirun: model=llama_60m,llama_130m
                if choice not in options:
                    raise bad_value(key, choice, options)


def main() -> None:
    try:
        _check_group_choices(sys.argv[1:])
    except ConfigError as err:
        print(f"dlr-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
