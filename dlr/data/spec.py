"""The validated data configuration (one flat mapping, the Hydra `data` group)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dlr.config import DataConfig, build
from dlr.errors import ConfigError, bad_value


@dataclass(frozen=True)
class DataSpec:
    """A validated data config; each field's meaning: dlr.config.DataConfig."""

    source: str = "hub"
    path: str = "allenai/c4"
    name: str | None = "en"
    train_files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    text_field: str = "text"
    sample_by: str = "paragraph"
    tokenizer: str = "t5"
    seq_len: int = 256
    mode: str = "paper"
    shuffle_buffer: int = 10_000
    num_workers: int = 2
    val_tokens: int | None = 10_000_000
    prefetch: int = 4


def _files(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def _example(key: str) -> str:
    return "<the directory dlr-prepare wrote>" if key == "path" else "<path or glob>"


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
    train_files, validation_files = _files(c.train_files), _files(c.validation_files)
    if c.source != "hub" and not train_files and not validation_files:
        raise ConfigError(
            f"data.source={c.source!r} needs data.train_files and/or data.validation_files (a path or glob)"
        )
    if c.source == "hub" and not c.path:
        raise bad_value("data.path", c.path, "a hub dataset id, e.g. allenai/c4")
    return DataSpec(
        source=c.source,
        path=c.path or "allenai/c4",
        name=c.name,
        train_files=train_files,
        validation_files=validation_files,
        text_field=c.text_field,
        sample_by=c.sample_by,
        tokenizer=c.tokenizer or "t5",
        seq_len=c.seq_len,
        mode=c.mode,
        shuffle_buffer=c.shuffle_buffer,
        num_workers=c.num_workers,
        val_tokens=c.val_tokens,
        prefetch=c.prefetch,
    )


def _tokens_spec(c: Any) -> DataSpec:
    """source=tokens: `path` is a dlr-prepare directory; `tokenizer` null = the one saved in it."""
    import os

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
