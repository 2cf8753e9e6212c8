"""Convert a format_version 2 model directory to the current format (what `dlr-fold upgrade=true` runs).

Version 2 stored a factorized projection's factors as bare tensors (`<proj>.A`, `<proj>.B`,
`<proj>.bias`); version 3 holds them as nn.Linear modules (`<proj>.A.weight`, `<proj>.B.weight`,
`<proj>.B.bias`) so that serving engines replace them with their own linear layers. The
conversion renames those tensors (their bytes are unchanged), ships the current code and
config and writes a new record; the input is verified first and never modified.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import method_named
from ..errors import ConfigError

OLD_VERSION = 2
_RENAMES = {"A": "A.weight", "B": "B.weight", "bias": "B.bias"}


def renamed(name: str, factorized: bool) -> str:
    """The version 3 name of a version 2 tensor (a dense model's projections keep theirs)."""
    module, _, leaf = name.rpartition(".")
    if factorized and module.endswith("_proj") and leaf in _RENAMES:
        return f"{module}.{_RENAMES[leaf]}"
    return name


def default_out(ckpt: Path) -> Path:
    return ckpt.with_name(f"{ckpt.name}-v3")


def _verified_v2(ckpt: Path, verify: bool) -> dict:
    from .model_dir import META_FILE, read_meta, sha256_file

    meta = read_meta(ckpt)
    version = meta.get("format_version")
    if version != OLD_VERSION:
        raise ConfigError(f"{str(ckpt / META_FILE)!r} has format_version={version!r}; upgrade=true converts "
                          f"format_version={OLD_VERSION} only")
    for name, digest in meta.get("sha256", {}).items() if verify else ():
        if sha256_file(ckpt / name) != digest:
            raise ConfigError(f"weight file {str(ckpt / name)!r} does not match its sha256 in {META_FILE} (corrupted); "
                              "accepted: an intact copy (verify=false skips this check)")
    return meta


def upgrade_model_dir(ckpt: str | os.PathLike, out: str | os.PathLike | None = None, *, overwrite: bool = False,
                      verify: bool = True) -> Path:
    """Write the format_version 2 directory `ckpt` as a current one at `out` (default `<ckpt>-v3`)."""
    from safetensors.torch import load_file

    from ..data import load_tokenizer
    from .fold import resolve_out
    from ..hf import DlrLlamaForCausalLM
    from .model_dir import find_tokenizer, read_config, save_model_dir, weight_files

    ckpt = Path(ckpt).expanduser()
    config = read_config(ckpt)
    find_tokenizer(ckpt)
    target = resolve_out(ckpt, out or default_out(ckpt), False, overwrite)
    meta = _verified_v2(ckpt, verify)
    factorized = method_named(config.dlr_method).factorized
    state: dict[str, torch.Tensor] = {}
    for shard in weight_files(ckpt):
        state |= {renamed(k, factorized): t for k, t in load_file(str(ckpt / shard)).items()}
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = DlrLlamaForCausalLM(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ConfigError(f"{str(ckpt)!r} does not hold a version {OLD_VERSION} {config.dlr_method} model's tensors "
                          f"({' '.join(str(e).split())[:160]})") from None
    with torch.device("cpu"):  # non-persistent rotary buffers are still on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    if (ckpt / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(ckpt)
    # Directory names only: no path of this machine travels with the model. The card is written
    # anew (the old one's snippets are of the old format); the fold report is kept.
    extra = {**_without_paths(meta.get("extra", {})), "upgraded_from": ckpt.resolve().name}
    report = ckpt / "fold_report.json"
    files = {report.name: _without_paths(json.loads(report.read_text()))} if report.is_file() else {}
    return save_model_dir(model, load_tokenizer(str(ckpt)), target, extra=extra, files=files)


def _without_paths(record: dict) -> dict:
    """Version 2 recorded absolute paths (folded_from, a fold report's input and output): their names."""
    keys = ("folded_from", "finetuned_from", "exported_from", "input", "output")
    return {k: Path(v).name if k in keys and isinstance(v, str) else v for k, v in record.items()}
