"""Command-line keys: the short forms (`rank=8` for `factorization.rank=8`), the full list
of a command's keys, and the field a key names."""
from __future__ import annotations

import dataclasses

from .commands import COMMAND_SCHEMAS, SHORT_SECTIONS
from .fields import settings_of


def short_names(command: str) -> dict[str, str]:
    """{bare name: dotted key} for the sections of `command` whose keys may be typed bare."""
    schema = COMMAND_SCHEMAS[command]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out: dict[str, str] = {}
    for sec in SHORT_SECTIONS.get(command, ()):
        for f in dataclasses.fields(fields[sec].metadata["section"]):
            out[f.name] = f"{sec}.{f.name}"
    return out


def canonical_key(command: str, key: str) -> str:
    """The dotted key a command-line key means (`rank` -> `factorization.rank`,
    `wandb.project` -> `logging.wandb.project`); other keys as they are."""
    head, dot, rest = key.partition(".")
    full = short_names(command).get(head)
    return full + dot + rest if full else key


def all_keys(command: str) -> dict[str, dataclasses.Field]:
    """Every dotted key of a command (a group's keys from all its schemas) -> its field."""
    return dict(settings_of(COMMAND_SCHEMAS[command]))


def find_field(command: str, key: str) -> dataclasses.Field | None:
    return all_keys(command).get(canonical_key(command, key))


def display_key(command: str, key: str) -> str:
    """How users type a key: the short form where there is one."""
    shorts = {v: k for k, v in short_names(command).items()}
    for full, short in shorts.items():
        if key == full or key.startswith(full + "."):
            return short + key[len(full):]
    return key


def short_form(command: str, values: dict) -> dict:
    """A nested config (config.yaml) with the short sections' keys lifted to the top level, as
    users type them: {"factorization": {"alpha": 1}} -> {"alpha": 1}."""
    sections = SHORT_SECTIONS.get(command, ())
    out = {k: v for k, v in values.items() if k not in sections}
    for sec in sections:
        out.update(values.get(sec) or {})
    return out
