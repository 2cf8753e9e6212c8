"""The one entry pattern of dlr-train, dlr-eval, dlr-fold and dlr-compare.

Each command is `main(argv) -> run_cli(prog, usage, body, argv)`: `body` gets the arguments
and returns an exit code, and `run_cli` maps failures onto the one exit-code convention:

    0  done            2  bad input (one line: `<prog>: error: ...`, nothing written)
    3  diverged        1  a bug (Python's traceback)

Configs are composed with Hydra's compose API (same key=value grammar and config groups as
`@hydra.main`, no outputs/ directory, no chdir) by `load_config`, which refuses unknown keys
before composing and validates the result against dlr/schema.py before anything runs.
dlr-train keeps `@hydra.main` for multirun (-m), but checks every sweep combination with
`load_config` first.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dlr.errors import ConfigError, TrainingDiverged, bad_value

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_CHECK_FAILED = 1  # dlr-fold: the fold's verification failed (reported above, nothing written)
GROUPS = ("model", "data", "optimizer")


def group_options(group: str) -> list[str]:
    d = resources.files("dlr.configs") / group
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


def parse_overrides(args: list[str]) -> list[Any]:
    """Hydra's own override parser; a malformed override is one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    for o in args:
        if "=" not in o and not o.startswith("~"):
            raise ConfigError(f"argument {o!r} is not a key=value override; e.g. steps=100")
    try:
        return OverridesParser.create().parse_overrides(list(args))
    except HydraException as e:
        first = " ".join(str(e).split("\n")[0].split())
        raise ConfigError(f"bad command-line override: {first}") from None


def check_override_keys(command: str, args: list[str]) -> None:
    """Every key an override names is a setting of `command` (a `+key=` too); groups name an option."""
    from dlr.schema import COMMAND_SCHEMAS, all_keys, find_field, unknown_key

    known = all_keys(COMMAND_SCHEMAS[command])
    groups = [g for g in GROUPS if any(k.startswith(g + ".") for k in known)]
    for o in parse_overrides(args):
        key = o.key_or_group
        if key == "hydra" or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        if key in groups:
            options = group_options(key)
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for v in values:
                if v not in options:
                    raise bad_value(key, v, options)
            continue
        if key in known and not o.is_sweep_override():
            # OmegaConf would take yes/no/on/off/1/0 for a bool; a setting says true or false.
            f = find_field(COMMAND_SCHEMAS[command], key)
            value = o.value()
            if f is not None and str(f.type) == "bool" and not isinstance(value, bool) and not \
                    (isinstance(value, str) and value.startswith("${")):
                raise bad_value(key, value, "true, false")
        if key not in known:
            prefix, _, leaf = key.rpartition(".")
            siblings = [k[len(prefix) + 1:] for k in known if k.rpartition(".")[0] == prefix] if prefix else \
                sorted({k.split(".")[0] for k in known})
            if siblings:
                raise unknown_key(leaf, siblings, prefix + "." if prefix else "")
            raise unknown_key(key, known)


def _compose_error(e: BaseException) -> ConfigError:
    """OmegaConf's typed-merge errors (e.g. steps=abc) as our one line."""
    import re

    text = str(e)
    m = re.search(r"Error merging override (\S+?)=(.*)", text)
    if m:
        key, value = m.group(1).lstrip("+~"), m.group(2).strip()
        from dlr.schema import COMMAND_SCHEMAS, describe_field
        import dataclasses

        accepted = None
        for schema in COMMAND_SCHEMAS.values():
            fields = {f.name: f for f in dataclasses.fields(schema)}
            if key in fields:
                accepted = describe_field(fields[key])
                break
        cause = " ".join(text.split("\n")[1:2]).strip()
        return ConfigError(f"{key}={value!r} is not valid; accepted: {accepted or cause}")
    first = " ".join(text.split("\n")[0].split())
    return ConfigError(f"bad command-line override: {first}")


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with key=value overrides; ConfigError on misuse."""
    import dlr.configs  # noqa: F401  (registers the schemas)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_override_keys(config_name, overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="dlr.configs", version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise _compose_error(e) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def load_config(command: str, overrides: list[str]) -> DictConfig:
    """compose + the schema's checks: what every command runs on, validated before use."""
    from dlr.schema import COMMAND_SCHEMAS, validate

    cfg = compose(command, overrides)
    validate(COMMAND_SCHEMAS[command], cfg)
    return cfg


def required(cfg: DictConfig, key: str, example: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
        raise ConfigError(f"{key} is required; e.g. {key}={example}")
    return cfg[key]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun / accelerate launch export them."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write strict JSON atomically (temp file + rename) so a reader never sees half a file."""
    from dlr.atomic import write_atomic
    from dlr.train.rundir import dumps_strict

    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"out={str(p)!r} is a directory; give a file name, e.g. out={p / 'eval.json'}")
    return write_atomic(p, dumps_strict(obj, indent=2, sort_keys=True) + "\n")


USAGE_FLAGS = ("-h", "--help")


def guarded(prog: str, body: Callable[..., int], *args: Any) -> int:
    """body(*args) -> its exit code; ConfigError -> 2 and TrainingDiverged -> 3, each one line on stderr."""
    try:
        return body(*args)
    except ConfigError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        print(f"{prog}: diverged: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def run_cli(prog: str, usage: str, body: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """Call body(args) and exit with its code (see the module docstring for the convention)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in USAGE_FLAGS for a in args):
        print(usage.strip())
        sys.exit(0)
    sys.exit(guarded(prog, body, args))
