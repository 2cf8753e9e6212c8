"""The validated data configuration (one flat mapping, the Hydra `data` group)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dlr.errors import ConfigError, bad_value

SOURCES = ("hub", "json", "text", "tokens")
MODES = ("paper", "packed")
SAMPLE_BY = ("paragraph", "line")


@dataclass(frozen=True)
class DataSpec:
    source: str = "hub"
    # Hub dataset id and config (source == "hub"); for source == "tokens", the directory that
    # dlr-prepare wrote (token shards + manifest.json).
    path: str = "allenai/c4"
    name: str | None = "en"
    # Per split: a path, a glob, or a list of them. For the hub, globs relative to the dataset
    # repo (default `<name>/c4-<split>.*.json.gz`). `pkg://dlr.assets/...` = bundled files.
    train_files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    text_field: str = "text"
    # Plain-text source only: one document per blank-line-separated block, or per line.
    sample_by: str = "paragraph"
    tokenizer: str = "t5"
    seq_len: int = 256
    mode: str = "paper"
    # Documents are shuffled in blocks of this many (0 = no shuffling at all, files in order).
    shuffle_buffer: int = 10_000
    num_workers: int = 2
    # Validation token budget; None = the whole validation split.
    val_tokens: int | None = 10_000_000
    # source == "tokens" only: batches built ahead in a background thread (0 = built in the
    # caller), so reading shards is never in the training step's critical path.
    prefetch: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


def _files(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    try:
        items = tuple(value)
    except TypeError:
        raise bad_value(key, value, "a path, a glob, or a list of them") from None
    if not all(isinstance(v, str) and v for v in items):
        raise bad_value(key, value, "a path, a glob, or a list of them")
    return items


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        # Strings like "10_000" from the command line are accepted by Hydra as ints already.
        raise bad_value(key, value, f"an integer >= {minimum}")
    return value


def _example(key: str) -> str:
    return "<the directory dlr-prepare wrote>" if key == "path" else "<path or glob>"


def data_spec(cfg: Mapping[str, Any]) -> DataSpec:
    """Validate a data config (dict or DictConfig) into a DataSpec; ConfigError on bad values."""
    try:  # DictConfig -> plain containers, resolving interpolations; `???` raises here.
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            missing = [k for k in cfg if OmegaConf.is_missing(cfg, k)]
            if missing:
                raise ConfigError(f"data.{missing[0]} is required (it is '???'); set data.{missing[0]}={_example(missing[0])}")
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a dependency
        pass
    cfg = dict(cfg)
    for k, v in cfg.items():
        if v == "???":
            raise ConfigError(f"data.{k} is required (it is '???'); set data.{k}={_example(k)}")
    known = {f.name for f in dataclasses.fields(DataSpec)} - {"extra"}
    kw = {k: cfg[k] for k in known if k in cfg}
    extra = {k: v for k, v in cfg.items() if k not in known}

    source = kw.get("source", "hub")
    if source not in SOURCES:
        raise bad_value("data.source", source, SOURCES)
    mode = kw.get("mode", "paper")
    if mode not in MODES:
        raise bad_value("data.mode", mode, MODES)
    sample_by = kw.get("sample_by", "paragraph")
    if sample_by not in SAMPLE_BY:
        raise bad_value("data.sample_by", sample_by, SAMPLE_BY)
    seq_len = _int("data.seq_len", kw.get("seq_len", 256), 2)
    shuffle_buffer = _int("data.shuffle_buffer", kw.get("shuffle_buffer", 10_000), 0)
    num_workers = _int("data.num_workers", kw.get("num_workers", 2), 0)
    val_tokens = kw.get("val_tokens", 10_000_000)
    if val_tokens is not None:
        val_tokens = _int("data.val_tokens", val_tokens, 1)
    prefetch = _int("data.prefetch", kw.get("prefetch", 4), 0)
    train_files = _files("data.train_files", kw.get("train_files"))
    validation_files = _files("data.validation_files", kw.get("validation_files"))
    if source == "tokens":
        return _tokens_spec(kw, extra, seq_len, mode, shuffle_buffer, val_tokens, prefetch)
    if source != "hub" and not train_files and not validation_files:
        raise ConfigError(
            f"data.source={source!r} needs data.train_files and/or data.validation_files (a path or glob)"
        )
    for key in ("path", "text_field", "tokenizer"):
        if key == "path" and source != "hub" and kw.get(key) is None:
            continue  # only the hub source uses `path`
        if key in kw and (not isinstance(kw[key], str) or not kw[key]):
            raise bad_value(f"data.{key}", kw[key], "a non-empty string")
    name = kw.get("name", "en")
    if name is not None and not isinstance(name, str):
        raise bad_value("data.name", name, "a string or null")
    return DataSpec(
        source=source,
        path=kw.get("path") or "allenai/c4",
        name=name,
        train_files=train_files,
        validation_files=validation_files,
        text_field=kw.get("text_field", "text"),
        sample_by=sample_by,
        tokenizer=kw.get("tokenizer", "t5"),
        seq_len=seq_len,
        mode=mode,
        shuffle_buffer=shuffle_buffer,
        num_workers=num_workers,
        val_tokens=val_tokens,
        prefetch=prefetch,
        extra=extra,
    )


def _tokens_spec(kw: dict[str, Any], extra: dict[str, Any], seq_len: int, mode: str, shuffle_buffer: int,
                 val_tokens: int | None, prefetch: int) -> DataSpec:
    """source=tokens: `path` is a dlr-prepare directory; `tokenizer` null = the one saved in it."""
    import os

    path = kw.get("path")
    if not isinstance(path, str) or not path:
        raise bad_value("data.path", path, "the directory written by dlr-prepare (data=tokens data.path=DIR)")
    path = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        what = "does not exist" if not os.path.exists(path) else "holds no manifest.json (not a dlr-prepare output, or its prepare has not finished)"
        raise ConfigError(f"data.path={path!r} {what}; write it with: dlr-prepare data=<data config> out={path}")
    tokenizer = kw.get("tokenizer")
    if tokenizer is None:
        tokenizer = os.path.join(path, "tokenizer")
    elif not isinstance(tokenizer, str) or not tokenizer:
        raise bad_value("data.tokenizer", tokenizer, "null (the tokenizer saved with the shards), 't5', an HF name or a path")
    return DataSpec(source="tokens", path=path, name=None, tokenizer=tokenizer, seq_len=seq_len, mode=mode,
                    shuffle_buffer=shuffle_buffer, num_workers=0, val_tokens=val_tokens, prefetch=prefetch, extra=extra)
