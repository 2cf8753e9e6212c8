"""The self-describing model directory: safetensors + config.json + modeling code + tokenizer.

Layout (what `save_model_dir` writes, and `final/`, `folded/` and `dlr-fold` outputs are):

    config.json                     DlrLlamaConfig: LLaMA dims + dlr_* (method, rank, ...)
    model.safetensors | model-0000k-of-0000n.safetensors + model.safetensors.index.json
    configuration_dlr.py, lowrank.py, modeling_dlr.py   HF remote code (auto_map)
    generation_config.json
    spiece.model + tokenizer.json + tokenizer_config.json (T5, loadable by AutoTokenizer)
                                    | the tokenizer files of an HF tokenizer
    README.md                       the model card (YAML front matter + text): the caller's, else
                                    one written from `extra` and the fold report
    dlr_checkpoint.json             format version, dlr version, size and sha256 of every
                                    other file (all a loader may read), caller's `extra`

The dense export (dlr.artifacts.export) has the same layout with a plain LlamaForCausalLM's config.json
and no .py files. No file holds a path of the machine that wrote it.

A dlr-quantize directory has the same files plus `quantization_config` in config.json
(compressed-tensors) and quantize_report.json; `load_model_dir` hands it to transformers'
quantizer for that format.

Nothing here uses pickle. The per-layer expand index (`*.dlr_index`, random_reuse
included) is a persistent buffer, so it travels in the safetensors with the weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir
from ..config import method_named
from ..errors import ConfigError, bad_value
from ..hf import DlrLlamaConfig, DlrLlamaForCausalLM
from ..hf.lowrank import LowRankLinear

FORMAT_VERSION = 3  # 3: the factors are nn.Linear modules (<proj>.A.weight, .B.weight, .B.bias)
META_FILE = "dlr_checkpoint.json"
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CARD_FILE = "README.md"
DENSE_MODEL_TYPE = "llama"  # the dense export (dlr.artifacts.export): a plain LlamaForCausalLM
# Not in the record: no loader reads them, and a card may be edited before publishing.
UNRECORDED = (CARD_FILE, META_FILE)
# Shards bound the transient memory of safetensors' serializer (it turns a whole shard into
# bytes before writing), so saving a 7B model costs about one shard on top of the model.
MAX_SHARD_SIZE = "2GB"
TOKENIZER_MARKERS = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dlr_version() -> str:
    try:
        from importlib.metadata import version

        return version("dlr")
    except Exception:  # running from a source tree without install metadata
        return "unknown"


def save_model_dir(
    model: DlrLlamaForCausalLM,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    extra: dict | None = None,
    files: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` + `tokenizer` as a model directory at `out_dir`, atomically: config.json,
    the weights, the shipped code, the tokenizer, the card and the record.

    Everything is written into a temporary sibling directory which is then renamed, so a
    crash leaves either the old directory or the complete new one, never a half-written
    one. An existing `out_dir` is replaced. `extra` (JSON-able) is stored under "extra" in
    dlr_checkpoint.json (e.g. step, tokens seen, final val loss); `files` maps extra file
    names to JSON-able objects written next to the weights (e.g. fold_report.json).
    `state_dict`: the weights to write in place of the model's own, e.g. those of an FSDP2-sharded
    model gathered on the main process (dlr.train.sharding.save_final); the files are the same
    bytes a single process writes.
    """
    if not isinstance(model, DlrLlamaForCausalLM):
        raise ConfigError(f"save_model_dir expects a DlrLlamaForCausalLM, got {type(model).__name__}")
    if tokenizer is None:
        raise ConfigError("save_model_dir needs a tokenizer: a model directory must be self-describing")
    with write_errors(out_dir), atomic_dir(out_dir) as tmp:
        save_pretrained_quietly(model, tmp, **({} if state_dict is None else {"state_dict": dict(state_dict)}))
        finish_model_dir(tmp, extra, tokenizer=tokenizer, files=files)
    return Path(out_dir).expanduser().absolute()


@contextlib.contextmanager
def write_errors(out_dir: str | os.PathLike) -> Iterator[None]:
    """A write that fails (disk full, no permission) is one ConfigError naming the cause; the
    atomic writer has already removed its temporary, so nothing is left behind."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        raise ConfigError(f"cannot write {str(out_dir)!r}: {e.strerror or e}") from None
    except SafetensorError as e:  # the Rust serializer's io error: 'Os { code: 28, ..., message: "No space ..." }'
        found = re.search(r'message: "([^"]+)"', str(e))
        raise ConfigError(f"cannot write {str(out_dir)!r}: {found.group(1) if found else ' '.join(str(e).split())[:160]}") from None


def finish_model_dir(tmp: str | os.PathLike, extra: dict | None = None, *, tokenizer: Any = None,
                     files: Mapping[str, Any] | None = None) -> None:
    """Make the model directory `tmp` (weights and config.json already in it) complete: the
    tokenizer, the extra `files`, the model card (README.md, unless `files` holds one) and
    dlr_checkpoint.json with `extra` and the size and sha256 of every other file.

    For any Hugging Face model directory dlr writes (dlr_llama through `save_model_dir`, the dense
    llama export, a dlr-quantize directory): the record is what
    `check_integrity` verifies before a loader reads a byte. Nothing may be written after it.
    """
    tmp = Path(tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    for name, obj in (files or {}).items():
        if isinstance(obj, str):  # text as is (the model card)
            (tmp / name).write_text(obj)
        else:
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    if CARD_FILE not in (files or {}):
        write_model_card(tmp, extra or {}, (files or {}).get("fold_report.json"))
    meta = {
        "format": "dlr-model-dir",
        "format_version": FORMAT_VERSION,
        "dlr_version": _dlr_version(),
        # Every file a loader may read: sizes catch a truncated file cheaply (always checked),
        # sha256 any changed byte (verify=true); a file not listed here is refused.
        "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                  for name in recorded_names(tmp)},
        "extra": extra or {},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def recorded_names(d: Path) -> list[str]:
    """The files of `d` that the record must cover: all but the card, the record itself and hidden
    files (the Hub's .gitattributes, huggingface_hub's .cache/), which no loader reads."""
    names = []
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d)
        if f.is_file() and rel.as_posix() not in UNRECORDED and not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix())
    return names


def write_model_card(tmp: Path, extra: dict, fold: dict | None) -> None:
    """README.md in the Hub's model-card format, from config.json, the weights and `extra`."""
    from safetensors import safe_open

    from .model_card import dense_card, model_card

    params = 0
    for f in sorted(tmp.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys() if not k.endswith(".dlr_index"))
    raw = json.loads((tmp / CONFIG_FILE).read_text())
    card = model_card(read_config(tmp), params, extra, fold) if raw.get("model_type") == DlrLlamaConfig.model_type \
        else dense_card(raw, params, extra, fold)
    (tmp / CARD_FILE).write_text(card)


def save_pretrained_quietly(model: Any, path: Path, **kwargs: Any) -> None:
    """save_pretrained in bounded shards, without HF's progress bar in our CLI output."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, **{"max_shard_size": MAX_SHARD_SIZE, **kwargs})
    finally:
        if bar:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- validation


def _check_dir(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_dir():
        raise ConfigError(f"checkpoint {str(p)!r} is not a directory; expected a dlr model directory (config.json + *.safetensors)")
    if not (p / CONFIG_FILE).is_file():
        raise ConfigError(f"checkpoint {str(p)!r} is not a dlr model directory: no config.json")
    return p


def read_config(path: str | os.PathLike, dense: bool = False) -> Any:
    """The checkpoint's DlrLlamaConfig, validated, without touching the weights; with `dense`,
    the LlamaConfig of a dense export (`dlr-fold dense=true`) is accepted too."""
    p = _check_dir(path)
    try:
        raw = json.loads((p / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(p / CONFIG_FILE)!r} is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    accepted = (DlrLlamaConfig.model_type, DENSE_MODEL_TYPE) if dense else (DlrLlamaConfig.model_type,)
    if not isinstance(raw, dict) or raw.get("model_type") not in accepted:
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{str(p / CONFIG_FILE)!r} has model_type={got!r}; a dlr checkpoint has model_type="
                          + " or ".join(map(repr, accepted)))
    from transformers import LlamaConfig

    raw.pop("auto_map", None)  # only meaningful to AutoModel; we know the class
    cls = DlrLlamaConfig if raw["model_type"] == DlrLlamaConfig.model_type else LlamaConfig
    try:
        config = cls.from_dict(raw)
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise ConfigError(f"{str(p / CONFIG_FILE)!r} is not a valid dlr config ({msg})") from None
    _validate_dlr_fields(config, p / CONFIG_FILE)
    return config


def _validate_dlr_fields(c: DlrLlamaConfig, where: Path) -> None:
    from ..model.llama import check_factorization, factorization_of

    try:
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            v = getattr(c, field)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad_value(field, v, "a positive integer")
        if isinstance(c, DlrLlamaConfig):
            check_factorization(factorization_of(c), c.dlr_rank, c.hidden_size, c.intermediate_size, prefix="dlr_")
    except ConfigError as e:
        raise ConfigError(f"{str(where)!r}: {e}") from None


def weight_files(path: str | os.PathLike) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} from the index, or the single model.safetensors."""
    p = Path(path)
    if (p / INDEX_FILE).is_file():
        try:
            wmap = json.loads((p / INDEX_FILE).read_text())["weight_map"]
            assert isinstance(wmap, dict)
        except Exception:
            raise ConfigError(f"{str(p / INDEX_FILE)!r} is corrupted (not a JSON object with a weight_map)") from None
        shards: dict[str, list[str]] = {}
        for name, shard in wmap.items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not (p / shard).is_file():
                raise ConfigError(f"weight shard {str(p / shard)!r} listed in {INDEX_FILE} is missing")
        return shards
    if (p / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}
    if any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth")):
        raise ConfigError(f"checkpoint {str(p)!r} has pickled weights (.bin/.pt); dlr reads safetensors only")
    raise ConfigError(f"checkpoint {str(p)!r} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}")


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_integrity(p: Path, verify: bool = True) -> None:
    """Format version and recorded sizes always; with `verify`, the record must exist and list
    every file a loader may read (see `recorded_names`) with its sha256, and each must match
    (verify=False: trusted copies). Every refusal is one line naming the file."""
    meta_path = p / META_FILE
    if not meta_path.is_file():
        if verify:
            raise ConfigError(f"checkpoint {str(p)!r} has no {META_FILE}, so its files cannot be verified; "
                              "accepted: a directory written by dlr (verify=false loads it unchecked)")
        return
    meta = read_meta(p)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        how = f"convert it: dlr-fold ckpt={p} upgrade=true out=NEW" if version == 2 else \
            "re-save the model with the dlr that wrote it"
        raise ConfigError(f"{str(meta_path)!r} has format_version={version!r}; this dlr reads format_version={FORMAT_VERSION} "
                          f"only ({how})")
    record = meta.get("files")
    if not isinstance(record, dict) or not all(isinstance(v, dict) for v in record.values()):
        if verify:
            raise ConfigError(f"{str(meta_path)!r} has no record of the directory's files ('files': name -> bytes, sha256), "
                              "so they cannot be verified; accepted: a directory written by dlr (verify=false loads it unchecked)")
        return
    _check_sizes(p, record if verify else {k: v for k, v in record.items() if k.endswith(".safetensors")})
    if verify:
        _check_hashes(p, record)


def _check_sizes(p: Path, record: Mapping[str, dict]) -> None:
    """Each file there; a weight file of its recorded size (a cheap check for a truncated copy)."""
    for name, entry in sorted(record.items()):
        f = p / name
        if not f.is_file():
            raise ConfigError(f"{str(f)!r} is missing (listed in {META_FILE}); accepted: the complete directory dlr wrote")
        size = entry.get("bytes")
        if name.endswith(".safetensors") and isinstance(size, int) and f.stat().st_size != size:
            raise ConfigError(f"{str(f)!r} is truncated or corrupted: {f.stat().st_size} bytes, expected {size}")


def _check_hashes(p: Path, record: Mapping[str, dict]) -> None:
    for name in recorded_names(p):
        if name not in record:
            raise ConfigError(f"{str(p / name)!r} is not listed in {META_FILE} (added after saving), and a loader may read it; "
                              "accepted: the files dlr wrote (verify=false skips this check)")
    for name, entry in sorted(record.items()):
        digest = entry.get("sha256")
        if not isinstance(digest, str):
            raise ConfigError(f"{str(p / name)!r} has no sha256 in {META_FILE}, so it cannot be verified; "
                              "accepted: a directory written by dlr (verify=false skips this check)")
        if sha256_file(p / name) != digest:
            raise ConfigError(f"{str(p / name)!r} does not match its sha256 in {META_FILE} (changed after saving); "
                              "accepted: an intact copy (verify=false skips this check)")


def find_tokenizer(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not any((p / m).is_file() for m in TOKENIZER_MARKERS):
        raise ConfigError(
            f"checkpoint {str(p)!r} has no tokenizer (none of {', '.join(TOKENIZER_MARKERS)}); "
            "a model directory must carry the tokenizer it was trained with"
        )
    return p


# --------------------------------------------------------------------------- loading


def _fresh_rotary(model: Any, device: torch.device) -> None:
    # inv_freq is a non-persistent buffer: not in the safetensors, and still on meta.
    # Rebuilt on the CPU (the rope init functions compute there), then moved.
    rotary = model.model.rotary_emb
    with torch.device("cpu"):
        fresh = type(rotary)(config=model.config)
    model.model.rotary_emb = fresh.to(device)


def load_model_dir(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    dense: bool = False,
) -> tuple[Any, Any]:
    """Load a model directory; every problem is a one-line ConfigError naming the path.

    The model is built on `meta` (no allocation, no random init) and each tensor is read
    from safetensors straight to `device` and assigned, so peak memory is one model.
    `verify` requires the record in dlr_checkpoint.json and checks the sha256 of every file a
    loader may read against it before any weight is read (verify=False skips it for trusted
    copies). `dense` also accepts the dense export, loaded as a plain LlamaForCausalLM.
    Returns (model in eval mode, tokenizer).
    """
    from ..data import load_tokenizer

    p = _check_dir(path)
    config = read_config(p, dense=dense)
    find_tokenizer(p)
    shards = weight_files(p)
    check_integrity(p, verify)
    device = torch.device(device)
    if getattr(config, "quantization_config", None):
        return _load_quantized(p, config, device, dtype), load_tokenizer(str(p))
    model = _build_and_fill(p, config, shards, device, dtype)
    return model, load_tokenizer(str(p))


def _build_and_fill(p: Path, config: Any, shards: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """The model of `config` built on meta and filled from the checked shards, in eval mode."""
    from transformers import LlamaForCausalLM

    from ..model.llama import build_from_config

    if not isinstance(config, DlrLlamaConfig):  # the dense export
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    else:
        model = build_from_config(config, device="meta")  # with a registered method's own layers
    # Persistent buffers (dlr_index) are in state_dict, so the file must hold them too.
    expected = model.state_dict()
    found = _read_tensors(p, shards, expected=expected, config=config, device=device, dtype=dtype)
    missing = [k for k in expected if k not in found]
    if missing:
        raise ConfigError(
            f"checkpoint {str(p)!r} lacks {len(missing)} tensor(s) a {_describe(config)} model needs, "
            f"e.g. {missing[0]!r} (config.json and the weights disagree)"
        )
    for name, t in found.items():
        if name.endswith(".dlr_index"):
            _check_index(p, name, t, config.dlr_rank)
        elif not bool(torch.isfinite(t).all()):
            raise ConfigError(f"checkpoint {str(p)!r}: {name} contains NaN/inf (corrupted weights)")
    model.load_state_dict(found, strict=True, assign=True)
    del found
    _fresh_rotary(model, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a bug in this loader, not bad input
        raise RuntimeError(f"load_model_dir left tensors on meta: {leftover[:3]}")
    return model.eval()


_BAR = re.compile(r"^[^\n]*\|[^|]*\| *\d+/\d+ \[[^\]]*\]$")


@contextlib.contextmanager
def without_progress_bars() -> Iterator[None]:
    """compressed-tensors draws a tqdm bar per model pass (apply, compress, decompress, dispatch) with
    no switch to turn them off: their stderr is held, and every line that is not a bar goes through."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        kept = [line for line in held.getvalue().replace("\r", "\n").splitlines() if line.strip() and not _BAR.match(line)]
        if kept:
            print("\n".join(kept), file=sys.stderr)


def _load_quantized(p: Path, config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A dlr-quantize directory (of a dlr model or of the dense export): transformers' quantizer for
    its format (compressed-tensors) builds the quantized layers, which our meta-and-assign path does not know."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    cls = DlrLlamaForCausalLM if isinstance(config, DlrLlamaConfig) else LlamaForCausalLM
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with without_progress_bars():
            model = cls.from_pretrained(p, dtype=dtype, attn_implementation="sdpa")
    except ImportError as e:  # the format's package (compressed-tensors) is missing
        raise ConfigError(f"checkpoint {str(p)!r} is quantized and needs {e}; pip install 'dlr[quant]'") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    # Unpacked now, not by the hook on the first model(...) call: dlr's loss calls model.model,
    # which that hook does not see. The layers keep their scheme: weights hold the dequantized
    # integers and w8a8 quantizes each activation per token, as the packed form computes.
    with without_progress_bars():
        model.hf_quantizer.compressor.decompress_model(model)
    return model.to(device).eval()


def _read_tensors(p: Path, shards: Mapping[str, Any], *, expected: dict[str, torch.Tensor], config: DlrLlamaConfig,
                  device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the shards, checked against the model's names and shapes, on `device`."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, torch.Tensor] = {}
    for shard in shards:
        f_path = p / shard
        try:
            with safe_open(str(f_path), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name not in expected:
                        raise ConfigError(
                            f"{str(f_path)!r} holds {name!r}, which a {_describe(config)} model does not have "
                            "(config.json and the weights disagree)"
                        )
                    want = tuple(expected[name].shape)
                    got = tuple(f.get_slice(name).get_shape())
                    if got != want:
                        raise ConfigError(
                            f"{str(f_path)!r}: {name} has shape {list(got)} but config.json implies {list(want)} "
                            "(config/weights shape mismatch)"
                        )
                    t = f.get_tensor(name)
                    if t.is_floating_point():
                        t = t.to(dtype)
                    found[name] = t
        except SafetensorError as e:
            raise ConfigError(f"weight file {str(f_path)!r} is truncated or corrupted ({' '.join(str(e).split())[:120]})") from None
        except OSError as e:
            raise ConfigError(f"weight file {str(f_path)!r} cannot be read ({e.strerror or e})") from None
    return found


def _check_index(p: Path, name: str, index: torch.Tensor, rank: int) -> None:
    if index.dtype not in (torch.int64, torch.int32) or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= rank)):
        raise ConfigError(f"checkpoint {str(p)!r}: {name} is not an expand index into rank {rank} (corrupted weights)")


def _describe(c: Any) -> str:
    if not isinstance(c, DlrLlamaConfig):
        return "dense llama (exported)"
    state = "folded " if c.dlr_folded else ""
    rank = f" rank={c.dlr_rank}" if method_named(c.dlr_method).factorized else ""
    return f"{c.dlr_size or 'custom'} {state}{c.dlr_method}{rank}"


def describe(config: Any) -> str:
    """Short human description, e.g. 'llama_1b folded dlr rank=512' (a dense export: 'dense llama (exported)')."""
    return _describe(config)


def residual_layers(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, LowRankLinear) and m.has_residual)


def read_meta(path: str | os.PathLike) -> dict:
    """dlr_checkpoint.json ({} when there is none)."""
    f = Path(path) / META_FILE
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text())
    except Exception:
        raise ConfigError(f"{str(f)!r} is corrupted (not valid JSON)") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{str(f)!r} is corrupted (not a JSON object)")
    return meta
