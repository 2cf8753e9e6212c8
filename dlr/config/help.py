"""`--help` of each command, generated from the settings' declarations (no torch import)."""
from __future__ import annotations

import dataclasses
import textwrap
from importlib import resources

from .commands import COMMAND_SCHEMAS, SHORT_SECTIONS
from .fields import REQUIRED, describe_field, section_of

SUMMARIES = {
    "train": ("dlr-train [key=value ...]   (-m key=a,b ... for a Hydra multirun)",
              "Pre-train a full, low-rank or DLR LLaMA; writes a run directory (final/, folded/, metrics)."),
    "eval": ("dlr-eval ckpt=DIR [key=value ...]",
             "Perplexity of a model directory on a data config, or lm-evaluation-harness tasks."),
    "fold": ("dlr-fold ckpt=DIR [key=value ...]",
             "Fold the DLR residual into B, verify the logits on real batches, write a model directory."),
    "quantize": ("dlr-quantize ckpt=FOLDED_DIR [scheme=w8a8|w4a16] [key=value ...]",
                 "Quantize every factor of a folded model (compressed-tensors, served by vLLM), check perplexity "
                 "and greedy tokens, write a model directory."),
    "finetune": ("dlr-finetune ckpt=DIR data=PAIRS.jsonl [key=value ...]",
                 "Supervised fine-tuning (TRL) of a model directory; the loss is on responses only."),
    "prepare": ("dlr-prepare data=NAME out=DIR [key=value ...]",
                "Tokenize a data config once into memory-mapped token shards (then data=tokens data.path=DIR)."),
    "compare": ("dlr-compare RUN_DIR ... [key=value ...]",
                "Group finished runs by everything but the seed: mean ± std, paired differences, sweeps, plots."),
    "scaling": ("dlr-scaling RUN_DIR ... [key=value ...]",
                "Fit L(N, D) = E + A N^-alpha + B D^-beta per group of finished runs; predict and compare."),
}
GROUP_NAMES = ("model", "data", "optimizer")


def _options(group: str) -> list[str]:
    d = resources.files("dlr.configs") / group
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


def _group_defaults(command: str) -> dict[str, str]:
    import yaml

    text = (resources.files("dlr.configs") / f"{command}.yaml").read_text()
    out = {}
    for entry in (yaml.safe_load(text) or {}).get("defaults", []):
        if isinstance(entry, dict):
            out.update({str(k).replace("override ", ""): str(v) for k, v in entry.items()})
    return out


def _type(f: dataclasses.Field) -> str:
    tp = str(f.type).replace("typing.", "")
    if tp.startswith("Optional["):
        tp = tp[len("Optional["):-1]
    return {"Any": "value", "list[float]": "list"}.get(tp, tp)


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED
    else:
        value = f.default
    if value == REQUIRED:
        return "(required)"
    if isinstance(value, str) and value.startswith("${"):
        return "(" + value[2:-1].split(":")[0].replace("dlr_run_dir", "derived") + ")"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _rows(schema: type, prefix: str, short: bool) -> list[str]:
    rows = []
    for f in dataclasses.fields(schema):
        if section_of(f) is not None or f.metadata.get("group") is not None:
            continue
        key = f.name if short else prefix + f.name
        head = f"  {key:<24} {_type(f):<6} {_default(f):<16} "
        body = f.metadata.get("doc", "")
        m = f.metadata
        bounded = any(m.get(k) is not None for k in ("ge", "gt", "le", "lt"))
        if bounded or (m.get("choices") and not all(str(c) in body for c in m["choices"] if c is not None)):
            body += f" [{describe_field(f)}]"
        rows.append(textwrap.fill(body, width=118, initial_indent=head, subsequent_indent=" " * len(head)))
    return rows


def command_help(command: str) -> str:
    """The help page of one command: its groups, then every setting with type, default and meaning."""
    schema = COMMAND_SCHEMAS[command]
    usage, summary = SUMMARIES[command]
    lines = [f"usage: {usage}", "", summary, "Every setting is a key=value override; a typo'd key is refused.", ""]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    groups = [g for g in GROUP_NAMES if g in fields]
    if groups:
        defaults = _group_defaults(command)
        lines.append("config groups (name=OPTION, then name.key=value for one of its settings):")
        for g in groups:
            lines.append(f"  {g + '=':<24} {', '.join(_options(g))} (default {defaults.get(g, '-')})")
        lines.append("")
    top = [f for f in fields.values() if section_of(f) is None and f.metadata.get("group") is None]
    if top:
        lines += ["settings:" if len(top) == len(fields) - len(groups) else "run:", *_rows(schema, "", True), ""]
    for name in SHORT_SECTIONS.get(command, ()):
        f = fields[name]
        lines += [f"{name} ({f.metadata['doc']}; also {name}.KEY):", *_rows(section_of(f), name + ".", True)]
        for g in dataclasses.fields(section_of(f)):
            if section_of(g) is not None:
                lines += _rows(section_of(g), g.name + ".", False)
        lines.append("")
    for g in groups:
        schemas = fields[g].metadata["group"]
        for sub in ([schemas] if isinstance(schemas, type) else schemas.values()):
            label = f"{g}.KEY" + (f" (optimizer={sub().name})" if g == "optimizer" else "")
            lines += [f"{label}:", *_rows(sub, g + ".", False), ""]
    return "\n".join(lines).rstrip() + "\n"
