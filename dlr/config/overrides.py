"""key=value overrides -> a command's typed config, through Hydra's compose API.

Same grammar and config groups as `@hydra.main` (no outputs/ directory, no chdir). Every key
an override names is checked against the command's settings before composing (a typo'd key
is refused with the closest valid name), short keys are spelled out (`rank=8` ->
`factorization.rank=8`), and the composed config is validated into the typed dataclass.

    from dlr.config import from_overrides
    cfg = from_overrides("train", ["model=llama_tiny", "data=c4_sample", "steps=10"])
"""
from __future__ import annotations

import re
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dlr.errors import ConfigError, bad_value

GROUPS = ("model", "data", "optimizer")


def group_options(group: str) -> list[str]:
    """The options of a config group: its YAML files, and every registered optimizer."""
    from .sections import OPTIMIZER_SCHEMAS

    d = resources.files("dlr.configs") / group
    files = {p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml")}
    return sorted(files | set(OPTIMIZER_SCHEMAS) if group == "optimizer" else files)


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


def _split_override(o: str) -> tuple[str, str, str]:
    """(prefix, key, rest) of one override: `+rank=8` -> ("+", "rank", "=8")."""
    prefix = o[: len(o) - len(o.lstrip("+~"))]
    key, eq, value = o[len(prefix):].partition("=")
    return prefix, key, eq + value


def canonical_overrides(command: str, args: list[str]) -> list[str]:
    """Short keys spelled out (`rank=8` -> `factorization.rank=8`), in the keys and in the
    values' interpolations (`out_dir=runs/${method}`), so Hydra sees one key per setting."""

    from .keys import canonical_key

    def spell(m: re.Match) -> str:
        return "${" + canonical_key(command, m.group(1)) + "}"

    out = []
    for o in args:
        prefix, key, rest = _split_override(o)
        if not key.startswith("hydra"):
            o = prefix + canonical_key(command, key) + re.sub(r"\$\{([A-Za-z_][\w.]*)\}", spell, rest)
        out.append(o)
    return out


def _known_leaves(command: str, prefix: str, known: list[str]) -> list[str]:
    """The keys a user could have meant at this level (short forms at the top)."""
    from .keys import display_key

    if prefix:
        return sorted({k[len(prefix) + 1:] for k in known if k.rpartition(".")[0] == prefix})
    return sorted({display_key(command, k).split(".")[0] for k in known})


def check_override_keys(command: str, args: list[str]) -> None:
    """Every key an override names is a setting of `command` (a `+key=` too); groups name an option."""
    from .fields import unknown_key
    from .keys import all_keys, canonical_key, display_key

    known = all_keys(command)
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
        full = canonical_key(command, key)
        if full in known and not o.is_sweep_override():
            # OmegaConf would take yes/no/on/off/1/0 for a bool; a setting says true or false.
            value = o.value()
            _check_overflow(display_key(command, full), o.input_line.partition("=")[2].strip(), value, known[full])
            if str(known[full].type) == "bool" and not isinstance(value, bool) and not \
                    (isinstance(value, str) and value.startswith("${")):
                raise bad_value(key, value, "true, false")
        if full not in known:
            prefix, _, leaf = full.rpartition(".")
            siblings = _known_leaves(command, prefix, list(known))
            shown = display_key(command, prefix) if prefix else ""
            if siblings:
                raise unknown_key(leaf, siblings, shown + "." if shown else "")
            raise unknown_key(key, list(known))


def _check_overflow(key: str, text: str, value: Any, f: Any) -> None:
    """A number typed too large for a float (1e309) reads as inf: name what was typed, not inf."""
    import math

    from .fields import describe_field

    if isinstance(value, float) and not math.isfinite(value) and "inf" not in text.lower() and "nan" not in text.lower():
        raise ConfigError(f"{key}={text} is not valid (it overflows a float: {value}); accepted: {describe_field(f)}")


def _compose_error(command: str, e: BaseException) -> ConfigError:
    """OmegaConf's typed-merge errors (e.g. steps=abc) as our one line."""

    from .fields import describe_field
    from .keys import display_key, find_field

    text = str(e)
    m = re.search(r"Error merging override (\S+?)=(.*)", text)
    if m:
        key, value = m.group(1).lstrip("+~"), m.group(2).strip()
        f = find_field(command, key)
        cause = " ".join(text.split("\n")[1:2]).strip()
        accepted = describe_field(f) if f is not None else cause
        return ConfigError(f"{display_key(command, key)}={value!r} is not valid; accepted: {accepted}")
    first = " ".join(text.split("\n")[0].split())
    return ConfigError(f"bad command-line override: {first}")


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with key=value overrides; ConfigError on misuse."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .hydra import register

    register()
    check_override_keys(config_name, overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="dlr.configs", version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=canonical_overrides(config_name, overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise _compose_error(config_name, e) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def typed(command: str, cfg: DictConfig) -> Any:
    """A composed config as the command's typed dataclass: resolved, validated, defaults filled."""
    from omegaconf.errors import OmegaConfBaseException

    from .commands import COMMAND_SCHEMAS, SHORT_SECTIONS
    from .fields import build
    from .keys import display_key

    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        key = display_key(command, str(getattr(e, "full_key", None) or "config"))
        raise ConfigError(f"{key} cannot be resolved ({' '.join(str(e).split())[:160]})") from None
    return build(COMMAND_SCHEMAS[command], plain, short=SHORT_SECTIONS.get(command, ()))


def from_overrides(command: str, overrides: list[str]) -> Any:
    """compose + the settings' checks: the command's typed config, validated before use."""
    return typed(command, compose(command, overrides))


_OVERRIDE = re.compile(r"^[+~]*[A-Za-z_][\w.]*=")


def _list_values(command: str, args: list[str]) -> list[str]:
    """`by=alpha,rank` and `at=1e18` as users type a list; Hydra would read a bare comma list as a
    sweep, and a single value as no list."""
    from .keys import find_field

    out = []
    for a in args:
        key, _, value = a.partition("=")
        f = find_field(command, key.lstrip("+~"))
        if f is not None and "list" in str(f.type) and value != "null" and not value.startswith(("[", "'", '"', "$")):
            a = f"{key}=[{value}]"
        out.append(a)
    return out


def _flag_error(command: str, flag: str) -> ConfigError:
    """`--out DIR` where `out=DIR` is meant: one line naming the setting (`--no-plots`: plots=false)."""
    import difflib

    from .keys import all_keys, display_key

    name = flag.lstrip("-").partition("=")[0].replace("-", "_")
    known = [display_key(command, k) for k in all_keys(command)]
    negated = name.removeprefix("no_")
    if name != negated and negated in known:
        return ConfigError(f"{flag!r} is not a setting; settings are key=value: {negated}=false")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}=...?" if close else f"accepted: {', '.join(sorted(known))}"
    return ConfigError(f"{flag!r} is not a setting; settings are key=value; {hint}")


def from_command_line(command: str, args: list[str]) -> Any:
    """A command line of key=value settings and, for a command with a positional setting
    (`dlr-compare runs/a runs/b out=cmp`), bare arguments that fill it, in order."""
    import dataclasses

    from .commands import POSITIONAL

    bare, overrides = [], []
    for a in args:
        if a.startswith("-") and len(a) > 1:
            raise _flag_error(command, a)
        (overrides if _OVERRIDE.match(a) else bare).append(a)
    positional = POSITIONAL.get(command)
    if bare and positional is None:
        raise ConfigError(f"argument {bare[0]!r} is not a key=value override; e.g. out=DIR")
    cfg = from_overrides(command, _list_values(command, overrides))
    if bare:
        cfg = dataclasses.replace(cfg, **{positional: [*bare, *getattr(cfg, positional)]})
    return cfg
