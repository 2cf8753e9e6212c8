"""How a setting is declared and checked: `setting(...)`, one-line refusals, did-you-mean.

A setting is a dataclass field whose metadata holds its meaning and what it accepts; the
same metadata drives validation, the error messages, `--help` and the docs.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field
from typing import Any

from dlr.errors import ConfigError, bad_value

REQUIRED = "???"  # OmegaConf's "required" marker
# The largest finite float32: a larger setting would overflow where torch computes with it.
FP32_MAX = 3.4028234663852886e38


def setting(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            nonempty: bool = False, check: Callable[[Any], str | None] | None = None,
            runtime: bool = False) -> Any:
    """A dataclass field with its meaning (`doc`) and its accepted values.

    ge/gt/le/lt bound numbers; `choices` lists accepted values; `nonempty` refuses "" for
    strings; `check(value)` returns what is accepted when the value is refused, else None.
    `runtime`: changing it between a run and its resumption does not make it another run
    (it changes how, not what, is trained).
    """
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "nonempty": nonempty,
            "check": check, "runtime": runtime}
    if default is MISSING:
        default = REQUIRED  # keeps dataclass field order free
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str, *, runtime: bool = False) -> Any:
    """A nested section (a dataclass of settings) as a field of a larger config."""
    return field(default_factory=cls, metadata={"doc": doc, "section": cls, "runtime": runtime})


def group(schemas: type | dict[str, type], doc: str) -> Any:
    """A Hydra config group (configs/<group>/*.yaml) as a field: untyped for OmegaConf, so a
    group file's unset keys stay unset through the merge; typed once built.

    `schemas`: the group's one schema, or {name: schema} chosen by the node's `name` key.
    """
    return field(default=REQUIRED, metadata={"doc": doc, "group": schemas})


def group_schema(f: dataclasses.Field, value: Any, label: str) -> type | None:
    """The schema a group field's value is checked against (None: not a group)."""
    schemas = f.metadata.get("group")
    if schemas is None or isinstance(schemas, type):
        return schemas
    name = value.get("name") if isinstance(value, Mapping) else getattr(value, "name", None)
    if name not in schemas:
        raise bad_value(label, name, ", ".join(schemas))
    return schemas[name]


def group_schemas(f: dataclasses.Field) -> list[type]:
    schemas = f.metadata.get("group")
    if schemas is None:
        return []
    return [schemas] if isinstance(schemas, type) else list(schemas.values())


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(tp: Any) -> tuple[str, bool]:
    """(base type name, optional?) of a field annotation (a string under `from __future__`)."""
    tp = str(tp).replace("typing.", "")
    if tp.startswith("Optional["):
        return tp[len("Optional["):-1], True
    if tp.endswith(" | None"):
        return tp[: -len(" | None")], True
    return tp, False


def _type_ok(tp: Any, v: Any) -> tuple[bool, str]:
    """(accepted?, description) for a field's annotation."""
    base, optional = _type_name(tp)
    if v is None:
        return optional, base + (" or null" if optional else "")
    if base == "int":
        return isinstance(v, int) and not isinstance(v, bool), "an integer"
    if base == "float":
        return is_number(v) and math.isfinite(v) and abs(v) <= FP32_MAX, "a finite number (float32 range)"
    if base == "bool":
        return isinstance(v, bool), "true, false"
    if base == "str":
        return isinstance(v, str), "a string"
    return True, base


def describe_field(f: dataclasses.Field) -> str:
    """What a field accepts, in words (for error messages, --help and docs)."""
    m = f.metadata
    if m.get("choices"):
        return ", ".join("null" if c is None else str(c) for c in m["choices"])
    _, kind = _type_ok(f.type, object())
    bounds = [f"{op} {m[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if m.get(k) is not None]
    desc = kind + (" " + " and ".join(bounds) if bounds else "")
    return desc + (", or null" if _type_name(f.type)[1] else "")


def _as_declared(tp: Any, value: Any) -> Any:
    """A number given to a float setting (`lr=1`, `betas=[0,0.99]`) as the float it is declared,
    so code reads every setting as its type and never casts it again."""
    base, _ = _type_name(tp)
    if base == "float" and is_number(value):
        return float(value)
    if base == "list[float]" and isinstance(value, (list, tuple)) and all(is_number(v) for v in value):
        return [float(v) for v in value]
    return value


def check_value(f: dataclasses.Field, value: Any, label: str) -> Any:
    """Check one value against its field; returns it as declared (an int given to a float
    setting as a float), or raises a one-line ConfigError."""
    m = f.metadata
    if m.get("check"):
        why = m["check"](value)
        if why:
            raise bad_value(label, value, why)
        return _as_declared(f.type, value)
    ok, _ = _type_ok(f.type, value)
    if not ok or (value is not None and m.get("choices") and value not in m["choices"]):
        raise bad_value(label, value, describe_field(f))
    if m.get("nonempty") and value == "":
        raise bad_value(label, value, "a non-empty string")
    if is_number(value):
        for key, test in (("ge", float.__ge__), ("gt", float.__gt__), ("le", float.__le__), ("lt", float.__lt__)):
            if m.get(key) is not None and not test(float(value), float(m[key])):
                raise bad_value(label, value, describe_field(f))
    return _as_declared(f.type, value)


def check_field(schema: type, name: str, value: Any, label: str | None = None) -> Any:
    """check_value for the field `name` of `schema`."""
    return check_value(fields_of(schema)[name], value, label or name)


def fields_of(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def section_of(f: dataclasses.Field) -> type | None:
    return f.metadata.get("section")


def unknown_key(key: str, known: list[str], prefix: str = "") -> ConfigError:
    """`prefix+key` is no setting: one line with the closest valid name (difflib)."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {prefix + close[0]!r}?" if close else f"accepted: {', '.join(prefix + k for k in sorted(known))}"
    return ConfigError(f"unknown setting {prefix + key!r}; {hint}")


def required_error(label: str, f: dataclasses.Field) -> ConfigError:
    doc = f.metadata.get("doc")
    return ConfigError(f"{label} is required (it is unset); set {label}=<{doc}>" if doc else
                       f"{label} is required (it is unset); set {label}=...")


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain Python (the typed objects hold plain values)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def build(schema: type, values: Mapping[str, Any], prefix: str = "", *, short: tuple[str, ...] = ()) -> Any:
    """Validate a (possibly partial, already resolved) mapping into `schema`'s dataclass.

    Unknown keys, unset required values, bad types and ranges are refused with one line;
    missing keys take the declared defaults; nested sections are built recursively. Errors
    name a key of a section in `short` as users type it (bare: `rank`, not `factorization.rank`).
    """
    if type(values).__name__ == "DictConfig":  # a YAML file read by OmegaConf: its `???` must read as unset
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(values, resolve=True, throw_on_missing=False)
    if not isinstance(values, Mapping):
        raise bad_value(prefix.rstrip(".") or "config", values, f"a mapping of {schema.__name__} settings")
    fields = fields_of(schema)
    for key in values:
        if key not in fields:
            raise unknown_key(str(key), list(fields), prefix)
    out: dict[str, Any] = {}
    for name, f in fields.items():
        label = prefix + name
        if name not in values and f.metadata.get("group") is not None:
            raise required_error(label, f)
        sub = section_of(f) or (group_schema(f, values[name], label) if name in values else None)
        if name not in values:
            if f.default is MISSING and f.default_factory is MISSING:
                raise required_error(label, f)
            value = f.default if f.default is not MISSING else f.default_factory()
            if sub is None and value == REQUIRED:
                raise required_error(label, f)
            if sub is None or dataclasses.is_dataclass(value):
                out[name] = value
                continue
            value = {}
        else:
            value = values[name]
        if isinstance(value, str) and value == REQUIRED:
            raise required_error(label, f)
        if sub is not None:
            inner = prefix if name in short else label + "."
            out[name] = value if isinstance(value, sub) else build(sub, value, inner)
            continue
        value = _plain(value)
        if isinstance(value, dict):
            raise bad_value(label, value, describe_field(f))
        out[name] = check_value(f, value, label)
    return schema(**out)


def settings_of(schema: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every (dotted key, field) of a schema, sections and groups expanded (a group's keys
    from all its schemas), for key checks and --help."""
    out = []
    for f in dataclasses.fields(schema):
        subs = [section_of(f)] if section_of(f) else group_schemas(f)
        if subs:
            seen = set()
            for sub in subs:
                for key, g in settings_of(sub, f"{prefix}{f.name}."):
                    if key not in seen:
                        seen.add(key)
                        out.append((key, g))
        else:
            out.append((prefix + f.name, f))
    return out

