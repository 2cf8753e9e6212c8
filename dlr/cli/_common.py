"""Shared CLI plumbing for dlr-eval / dlr-fold: Hydra compose, one-line errors, ranks.

We use Hydra's compose API rather than `@hydra.main`: same key=value override grammar and
config groups, but no outputs/ directory, no log files, no chdir, and composition errors
(unknown data config, unknown key) become one line + exit code 2 instead of a traceback.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dlr.errors import ConfigError

EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 1


def group_options(group: str) -> list[str]:
    d = resources.files("dlr.configs") / group
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


def compose(config_name: str, overrides: list[str], groups: tuple[str, ...] = ("data",)) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with key=value overrides; ConfigError on misuse.

    `groups`: the config groups this config uses, whose choices are checked up front."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"argument {o!r} is not a key=value override; e.g. ckpt=runs/x/final")
        key, value = o.split("=", 1)
        group = key.lstrip("+~")
        if group in groups and value not in group_options(group):
            raise ConfigError(f"unknown data config {value!r}; accepted: {', '.join(group_options(group))}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="dlr.configs", version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (OverrideParseException, MissingConfigException, HydraException) as e:
        first = " ".join(str(e).split("\n")[0].split())
        raise ConfigError(f"bad command-line override: {first}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def required(cfg: DictConfig, key: str, example: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
        raise ConfigError(f"{key} is required; e.g. {key}={example}")
    return cfg[key]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun / accelerate launch export them."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"out={str(p)!r} is a directory; give a file name, e.g. out={p / 'eval.json'}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)
    return p


USAGE_FLAGS = ("-h", "--help")


def run_cli(prog: str, usage: str, body: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """Call body(args) and exit with its code; ConfigError -> `prog: error: <line>`, exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in USAGE_FLAGS for a in args):
        print(usage.strip())
        sys.exit(0)
    try:
        code = body(args)
    except ConfigError as e:
        msg = " ".join(str(e).split())
        print(f"{prog}: error: {msg}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
