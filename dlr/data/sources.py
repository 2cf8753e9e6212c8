"""Where documents come from: resolve a split's files, check them, and stream their texts.

Every source (hub C4, local C4 shards, plain text) goes through `datasets.load_dataset(...,
streaming=True)` one file at a time, so the file order (and hence shuffling and resume) is ours.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from dlr.data.spec import DataSpec
from dlr.errors import ConfigError

PKG_PREFIX = "pkg://dlr.assets/"
LOCAL_OPTION = (
    "without internet use data=c4_sample (bundled sample) or "
    "data=c4_local data.train_files=<glob> data.validation_files=<glob>"
)
_GLOB_CHARS = set("*?[")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def _resolve_pkg(pattern: str) -> str:
    rel = pattern[len(PKG_PREFIX):]
    return str(Path(str(resources.files("dlr.assets"))) / rel)


def _resolve_local(pattern: str, split: str, source: str) -> list[str]:
    if pattern.startswith(PKG_PREFIX):
        pattern = _resolve_pkg(pattern)
    pattern = os.path.expanduser(pattern)
    if not _GLOB_CHARS & set(pattern):
        if os.path.isdir(pattern):
            exts = (".txt",) if source == "text" else (".json.gz", ".json", ".jsonl", ".jsonl.gz")
            found = sorted(str(p) for p in Path(pattern).iterdir() if p.is_file() and p.name.endswith(exts))
            if not found:
                raise ConfigError(f"data.{split}_files: directory {pattern!r} holds no {'/'.join(exts)} files")
            return found
        if not os.path.isfile(pattern):
            raise ConfigError(f"data.{split}_files: path {pattern!r} does not exist")
        return [pattern]
    found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not found:
        raise ConfigError(f"data.{split}_files: glob {pattern!r} matches no files")
    return found


def _resolve_hub(spec: DataSpec, split: str, patterns: tuple[str, ...]) -> list[str]:
    if not patterns:  # C4's layout: <name>/c4-<split>.NNNNN-of-NNNNN.json.gz
        patterns = (f"{spec.name}/c4-{split}.*.json.gz" if spec.name else f"c4-{split}.*.json.gz",)
    try:
        import fsspec

        # fsspec's "hf" filesystem (huggingface_hub's HfFileSystem): the one `datasets` opens
        # the returned hf:// paths with, so listing and streaming resolve the same way.
        fs = fsspec.filesystem("hf")
        files: list[str] = []
        for pat in patterns:
            files += sorted(fs.glob(f"datasets/{spec.path}/{pat}"))
    except Exception as e:
        raise ConfigError(
            f"cannot reach the Hugging Face hub to stream {spec.path} ({spec.name}) [{_first_line(e)}]; {LOCAL_OPTION}"
        ) from None
    if not files:
        raise ConfigError(f"hub dataset {spec.path}: {split} files {list(patterns)} match nothing; {LOCAL_OPTION}")
    return ["hf://" + f for f in files]


def resolve_files(spec: DataSpec, split: str) -> list[str]:
    """The split's files in a fixed (sorted) order. split: 'train' or 'validation'."""
    patterns = spec.train_files if split == "train" else spec.validation_files
    if spec.source == "hub":
        return _resolve_hub(spec, split, patterns)
    if not patterns:
        raise ConfigError(f"data.{split}_files is empty; set it to a path or glob for source={spec.source!r}")
    files: list[str] = []
    for pat in patterns:
        files += _resolve_local(pat, split, spec.source)
    return files


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def check_local_file(spec: DataSpec, path: str) -> None:
    """Cheap upfront check (first record) so a wrong file fails with one line, before workers start."""
    if path.startswith("hf://"):
        return
    try:
        with _open_text(path) as f:
            if spec.source == "text":
                f.read(4096)
                return
            line = ""
            for line in f:
                if line.strip():
                    break
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ConfigError(f"cannot read {path!r} as {'text' if spec.source == 'text' else 'JSON lines'}: {_first_line(e)}") from None
    if not line.strip():
        return  # an empty file; an empty *split* is reported when streaming finds no documents
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise ConfigError(f"{path!r} is not JSON lines (first line does not parse as JSON)") from None
    if not isinstance(record, dict) or not isinstance(record.get(spec.text_field), str):
        raise ConfigError(f"{path!r}: records lack a string field data.text_field={spec.text_field!r}")


def _is_blank(path: str) -> bool:
    try:
        with _open_text(path) as f:
            return not any(line.strip() for line in f)
    except (OSError, UnicodeDecodeError, EOFError):
        return False  # let the real reader report it


def iter_file(spec: DataSpec, path: str, start: int = 0, batch_size: int = 1000) -> Iterator[tuple[int, str]]:
    """(record index, text) for records >= start of one file; blank documents are dropped
    (but still counted, so record indices are stable positions for resuming)."""
    import datasets

    if not path.startswith("hf://") and _is_blank(path):
        return  # datasets' json builder fails obscurely on an empty file; an empty split is ours to report
    try:
        if spec.source == "text":
            ds = datasets.load_dataset("text", data_files=[path], split="train", streaming=True, sample_by=spec.sample_by)
            field = "text"
        else:
            ds = datasets.load_dataset("json", data_files=[path], split="train", streaming=True)
            field = spec.text_field
        idx = 0
        for batch in ds.iter(batch_size=batch_size):
            if field not in batch:
                raise ConfigError(f"{path!r}: records lack a string field data.text_field={field!r}")
            texts = batch[field]
            n = len(texts)
            if idx + n <= start:
                idx += n
                continue
            for j in range(max(0, start - idx), n):
                t = texts[j]
                if isinstance(t, str) and t.strip():
                    yield idx + j, t
            idx += n
    except ConfigError:
        raise
    except Exception as e:
        if path.startswith("hf://") and isinstance(e, (OSError, ConnectionError)):
            raise ConfigError(f"cannot stream {path} from the Hugging Face hub [{_first_line(e)}]; {LOCAL_OPTION}") from None
        raise ConfigError(f"cannot read {path!r} as {'text' if spec.source == 'text' else 'JSON lines'}: {_first_line(e)}") from None
