"""dlr-finetune: supervised fine-tuning of a model directory (TRL SFTTrainer, loss on responses).

    dlr-finetune ckpt=runs/x/folded data=pairs.jsonl steps=200 lr=1e-4
    dlr-finetune ckpt=runs/x/folded data=pairs.jsonl eval_data=held_out.jsonl lora=true lora_rank=8
    dlr-finetune ckpt=DIR data=tatsu-lab/alpaca prompt_field=instruction response_field=output  # hub

`data` (short for train_data=) holds {prompt, response} records (field names: prompt_field=, response_field=). Writes
<out_dir>/final (default out_dir: <ckpt>-sft), a model directory with the input's exact shape
and parameter count; rerunning the same command resumes from the newest checkpoint.
Settings: configs/finetune.yaml; every one is a key=value override.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from dlr.cli._common import compose, run_cli, typed

PROG = "dlr-finetune"
USAGE = __doc__


def _given(cfg: Any, key: str) -> bool:
    from omegaconf.errors import MissingMandatoryValue

    try:
        value = getattr(cfg, key)
    except MissingMandatoryValue:  # a required setting left unset
        return False
    return value not in (None, "", "???")


def finetune_main(args: list[str]) -> int:
    # `data=` is what users type; Hydra would take it for the pre-training `data` config group.
    args = [f"train_data={a[5:]}" if a.startswith("data=") else a for a in args]
    raw = compose("finetune", args)
    if not _given(raw, "train_data"):
        from dlr.errors import ConfigError

        raise ConfigError("data is required; e.g. data=pairs.jsonl (a .jsonl of {prompt, response} records) or a hub dataset id")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from dlr.finetune import finetune

    cfg = typed("finetune", raw)  # refuses an unset ckpt, as every declared-required setting

    summary = finetune(cfg)  # checks every setting (dlr.finetune.validate) before anything is read
    print(json.dumps({k: summary[k] for k in ("train_loss", "eval_loss_before", "eval_loss_after", "params",
                                               "trainable_params", "final") if k in summary}))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, USAGE, finetune_main, argv)


if __name__ == "__main__":
    main()
