"""The validated data configuration (one flat mapping, the Hydra `data` group).

`DataSpec` is `dlr.config.DataConfig` frozen: the same fields with the same defaults, built
from its declaration, so a data setting is declared once. What it adds: file lists are tuples,
and `mix` holds the sources of a mixture as (name, weight, DataSpec) triples.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, field, fields, make_dataclass, replace
from importlib import resources
from typing import Any

from dlr.config import DataConfig, build
from dlr.errors import ConfigError, bad_value

_TUPLES = ("train_files", "validation_files", "mix")
# The keys that say where a mixture source's documents are; the rest (tokenizer, seq_len, mode,
# shuffle_buffer, num_workers, val_tokens, prefetch, exhausted) belong to the mixture as a whole.
SOURCE_KEYS = ("source", "path", "name", "train_files", "validation_files", "text_field", "sample_by", "holdout")


def _spec_field(f: Any) -> tuple[str, Any, Any]:
    if f.name in _TUPLES:
        return f.name, tuple, field(default=())
    default = f.default if f.default is not MISSING else f.default_factory()
    return f.name, f.type, field(default=default)


DataSpec = make_dataclass("DataSpec", [_spec_field(f) for f in fields(DataConfig)], frozen=True,
                          namespace={"__doc__": "A validated data config; each field's meaning: dlr.config.DataConfig."})
DataSpec.__module__ = __name__


def _files(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def data_spec(cfg: DataConfig | Mapping[str, Any]) -> DataSpec:
    """A data config (typed, or a mapping such as a configs/data/*.yaml file) as a DataSpec;
    ConfigError on bad values.

    Keys, types and ranges are checked where they are declared (dlr.config.DataConfig: an
    unknown key such as data.seq_lenn is refused); what ties several keys together is checked here.
    """
    c = cfg if isinstance(cfg, DataConfig) else build(DataConfig, cfg, "data.")
    if c.source == "tokens" and not isinstance(cfg, DataConfig) and "tokenizer" not in cfg:
        # Token shards carry their tokenizer: an unset one means that one, not the default t5.
        c = replace(c, tokenizer=None)
    if c.source == "tokens":
        return _tokens_spec(c)
    if c.source == "mix":
        return _mix_spec(c)
    if c.mix is not None:
        raise ConfigError(f"data.mix is set but data.source={c.source!r}; accepted: data.source=mix (or data=mix)")
    train_files, validation_files = _files(c.train_files), _files(c.validation_files)
    if c.source != "hub" and not train_files and not validation_files:
        raise ConfigError(
            f"data.source={c.source!r} needs data.train_files and/or data.validation_files (a path or glob)"
        )
    if c.source == "hub" and not c.path:
        raise bad_value("data.path", c.path, "a hub dataset id, e.g. allenai/c4")
    if c.holdout is not None and validation_files:
        raise ConfigError(f"data.holdout={c.holdout} takes the validation documents from the train split, but "
                          f"data.validation_files={list(validation_files)} is set too; accepted: one of them")
    if c.holdout is not None and c.source != "hub" and not train_files:
        raise ConfigError(f"data.holdout={c.holdout} holds out train documents, but data.train_files is empty")
    values = {f.name: getattr(c, f.name) for f in fields(DataConfig)}
    return DataSpec(**{**values, "path": c.path or "allenai/c4", "train_files": train_files,
                       "validation_files": validation_files, "tokenizer": c.tokenizer or "t5", "mix": ()})


def _config_file(name: str) -> Mapping[str, Any]:
    from omegaconf import OmegaConf

    here = resources.files("dlr.configs") / "data"
    names = sorted(p.name[:-5] for p in here.iterdir() if p.name.endswith(".yaml"))
    if name not in names or name in ("mix", "tokens"):
        raise bad_value("data.mix[].config", name, ", ".join(n for n in names if n not in ("mix", "tokens")))
    return OmegaConf.to_container(OmegaConf.load(str(here / f"{name}.yaml")))  # type: ignore[return-value]


def _mix_part(entry: Mapping[str, Any], parent: Any, i: int) -> tuple[str, float, DataSpec]:
    entry = dict(entry)
    weight = float(entry.pop("weight"))
    config, label = entry.pop("config", None), entry.pop("label", None)
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise ConfigError(f"data.mix[{i}]: key {unknown[0]!r} is not valid; accepted: weight, config, label, "
                          f"{', '.join(SOURCE_KEYS)}")
    base = {k: v for k, v in _config_file(config).items() if k in SOURCE_KEYS} if config else {}
    inherited = {f.name: getattr(parent, f.name) for f in fields(DataConfig) if f.name not in SOURCE_KEYS + ("mix",)}
    merged = {**inherited, **base, **entry}
    if merged.get("source") in ("mix", "tokens", None):
        raise bad_value(f"data.mix[{i}].source", merged.get("source"), "hub, json, parquet, text")
    spec = data_spec(merged)
    name = label or config or (spec.path if spec.source == "hub" else os.path.basename(spec.train_files[0]))
    return str(name), weight, spec


def _mix_spec(c: Any) -> DataSpec:
    """source=mix: each source a full DataSpec sharing the mixture's batching settings."""
    if not c.mix:
        raise ConfigError("data.source=mix needs data.mix: a list of {config: <data config>, weight: w} "
                          "(e.g. data=mix, or data.mix='[{config: c4_sample, weight: 1}]')")
    parts = tuple(_mix_part(e, c, i) for i, e in enumerate(c.mix))
    total = sum(w for _, w, _ in parts)
    if not total > 0:
        raise ConfigError(f"data.mix weights {[w for _, w, _ in parts]} sum to {total}; accepted: weights >= 0 "
                          "with a positive sum")
    names = [n for n, _, _ in parts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"data.mix: two sources are called {dup[0]!r}; give one a label: {{label: <name>, ...}}")
    values = {f.name: getattr(c, f.name) for f in fields(DataConfig) if f.name not in SOURCE_KEYS + ("mix",)}
    return DataSpec(**{**values, "source": "mix", "path": None, "name": None, "tokenizer": c.tokenizer or "t5",
                       "mix": parts})


def _tokens_spec(c: Any) -> DataSpec:
    """source=tokens: `path` is a dlr-prepare directory; `tokenizer` null = the one saved in it."""
    path = c.path
    if not isinstance(path, str) or not path:
        raise bad_value("data.path", path, "the directory written by dlr-prepare (data=tokens data.path=DIR)")
    path = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        what = "does not exist" if not os.path.exists(path) else "holds no manifest.json (not a dlr-prepare output, or its prepare has not finished)"
        raise ConfigError(f"data.path={path!r} {what}; write it with: dlr-prepare data=<data config> out={path}")
    tokenizer = c.tokenizer if c.tokenizer is not None else os.path.join(path, "tokenizer")
    return DataSpec(source="tokens", path=path, name=None, tokenizer=tokenizer, seq_len=c.seq_len, mode=c.mode,
                    shuffle_buffer=c.shuffle_buffer, num_workers=0, val_tokens=c.val_tokens, prefetch=c.prefetch)


# What names a data setting: two configs that agree on these read the same documents.
IDENTITY_KEYS = ("source", "path", "name", "train_files", "validation_files", "text_field")


def _named_configs() -> list[tuple[str, dict]]:
    """The bundled configs/data/<name>.yaml, as plain mappings (`???` kept: the user's value)."""
    from importlib import resources

    import yaml

    folder = resources.files("dlr.configs").joinpath("data")
    named = [(f.name[:-len(".yaml")], yaml.safe_load(f.read_text()) or {})
             for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")]
    # The most specific first: c4_sample's files before c4_local's "any files".
    return sorted(named, key=lambda item: sum(v == "???" for v in item[1].values()))


def _matches(named: dict, c: DataConfig) -> bool:
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(DataConfig)}
    for key in IDENTITY_KEYS:
        want = named.get(key, defaults[key])
        if want == "???":  # the setting asks the user for it: any value fits
            continue
        got = getattr(c, key)
        if key.endswith("_files") and _files(want) == _files(got):
            continue
        if want != got:
            return False
    return True


def data_provenance(cfg: DataConfig | Mapping[str, Any]) -> dict[str, str]:
    """What a model card says a run trained on: {"data": the configs/data/<name>.yaml the setting
    matches, "dataset": the Hugging Face Hub id its documents come from}, each only where known.

    Never a local path: a model directory must not carry the paths of the machine that wrote it.
    """
    c = cfg if isinstance(cfg, DataConfig) else build(DataConfig, cfg, "data.")
    if c.source == "tokens":
        return {"data": "tokens", **_prepared_from(c.path)}
    for name, named in _named_configs():
        if named.get("source", "hub") == c.source and _matches(named, c):
            hub = named.get("path", "allenai/c4") if c.source in ("hub", "json") else None
            return {"data": name, **({"dataset": hub} if hub and hub != "???" else {})}
    hub = {"dataset": c.path} if c.source == "hub" and c.path else {}
    return {"data": f"custom {c.source} data", **hub}


def _prepared_from(path: str | None) -> dict[str, str]:
    """The Hub id of the documents dlr-prepare tokenized into `path`, if they came from the Hub."""
    import json
    import os

    try:
        with open(os.path.join(os.path.expanduser(str(path)), "manifest.json"), encoding="utf-8") as f:
            source = json.load(f)["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {"dataset": source["path"]} if isinstance(source, dict) and source.get("source") == "hub" and source.get("path") else {}


def check_process(process_index: int, num_processes: int) -> None:
    """This process's place among the processes that share the data: a one-line error when it has none."""
    if not (isinstance(num_processes, int) and num_processes >= 1 and isinstance(process_index, int)
            and 0 <= process_index < num_processes):
        raise ConfigError(f"process_index={process_index!r}, num_processes={num_processes!r} are not valid; "
                          "accepted: integers with 0 <= process_index < num_processes")


# A data state's fingerprint names the process `process_index` of `num_processes`; states written
# by earlier versions of dlr say `rank` and `world_size`, read as the same so that they resume.
_PROCESS_KEYS = {"rank": "process_index", "world_size": "num_processes"}


def saved_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A data state's saved fingerprint under the names this dlr writes."""
    return {_PROCESS_KEYS.get(k, k): v for k, v in config.items()}
