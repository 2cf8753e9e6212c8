"""Where documents come from: resolve a split's files, check them, and stream their texts.

Every file is read through its `Format` (dlr.data.formats: JSON lines, Parquet, plain text
through `datasets` streaming, or one declared elsewhere) one file at a time, so the file order
(and hence shuffling and resume) is ours. A hub file's format is its extension's; a local file's
is data.source's. With data.holdout a split is a list of `Part`s: files, or record ranges of a
file, so that the held-out documents are the validation split and the train split skips them.
"""
from __future__ import annotations

import functools
import glob
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dlr.data.formats import extensions_of, first_line, format_of, open_text, text_blank
from dlr.data.spec import DataSpec
from dlr.errors import ConfigError

PKG_PREFIX = "pkg://dlr.assets/"
C4_LOCAL_OPTION = (
    "without internet use data=c4_sample (bundled sample) or "
    "data=c4_local data.train_files=<glob> data.validation_files=<glob>"
)
LOCAL_OPTION = C4_LOCAL_OPTION
_GLOB_CHARS = set("*?[")
_first_line = first_line


def local_option(spec: DataSpec) -> str:
    """What to use instead of the hub, in the one line that says the hub cannot be reached."""
    if spec.path == "allenai/c4":
        return C4_LOCAL_OPTION
    return ("without internet download the files and use data.source=<json|parquet|text> data.train_files=<glob> "
            "(and data.validation_files=<glob> or data.holdout=<documents>), or data=c4_sample (bundled sample)")


def _resolve_pkg(pattern: str) -> str:
    rel = pattern[len(PKG_PREFIX):]
    return str(Path(str(resources.files("dlr.assets"))) / rel)


def _resolve_local(pattern: str, split: str, source: str) -> list[str]:
    if pattern.startswith(PKG_PREFIX):
        pattern = _resolve_pkg(pattern)
    pattern = os.path.expanduser(pattern)
    if not _GLOB_CHARS & set(pattern):
        if os.path.isdir(pattern):
            exts = extensions_of(source)
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


def _card_patterns(fs: object, spec: DataSpec, split: str) -> tuple[str, ...] | None:
    """The split's data_files of config `data.name` in the dataset card (README.md YAML
    `configs:`, what `datasets` reads); None when the card declares no configs."""
    import yaml

    try:
        card = fs.cat_file(f"datasets/{spec.path}/README.md").decode("utf-8")  # type: ignore[attr-defined]
    except FileNotFoundError:
        return None
    if not card.startswith("---"):
        return None
    meta = yaml.safe_load(card.split("---", 2)[1]) or {}
    configs = {c.get("config_name", "default"): c for c in meta.get("configs") or [] if isinstance(c, dict)}
    if not configs:
        return None
    name = spec.name or "default"
    if name not in configs:
        raise ConfigError(f"data.name={spec.name!r} is not a config of hub dataset {spec.path}; accepted: "
                          f"{', '.join(configs)}")
    files = configs[name].get("data_files")
    if isinstance(files, (str, list)) and not (isinstance(files, list) and files and isinstance(files[0], dict)):
        files = [{"split": "train", "path": files}]
    paths = [d.get("path") for d in files or [] if d.get("split") == split]
    return tuple(p for ps in paths for p in ([ps] if isinstance(ps, str) else ps))


def _hub_glob(spec: DataSpec, split: str, patterns: tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
    import fsspec

    # fsspec's "hf" filesystem (huggingface_hub's HfFileSystem): the one `datasets` opens
    # the returned hf:// paths with, so listing and streaming resolve the same way.
    fs = fsspec.filesystem("hf")
    if not patterns:
        patterns = _card_patterns(fs, spec, split)
        if patterns is None:  # C4's layout: <name>/c4-<split>.NNNNN-of-NNNNN.json.gz
            patterns = (f"{spec.name}/c4-{split}.*.json.gz" if spec.name else f"c4-{split}.*.json.gz",)
    files: list[str] = []
    for pat in patterns:
        files += sorted(fs.glob(f"datasets/{spec.path}/{pat}"))
    return files, patterns


def _resolve_hub(spec: DataSpec, split: str, patterns: tuple[str, ...]) -> list[str]:
    try:
        files, patterns = _hub_glob(spec, split, patterns)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"cannot reach the Hugging Face hub to stream {spec.path} ({spec.name}) [{_first_line(e)}]; {local_option(spec)}"
        ) from None
    if not files and split == "validation" and not patterns:
        raise ConfigError(f"hub dataset {spec.path} ({spec.name}) has no validation split; set data.holdout=<documents> "
                          f"(held out from the train split) or data.validation_files=<glob in the repo>")
    if not files:
        raise ConfigError(f"hub dataset {spec.path}: {split} files {list(patterns)} match nothing; {local_option(spec)}")
    for f in files:
        format_of(spec, f)
    return ["hf://" + f for f in files]


def resolve_files(spec: DataSpec, split: str) -> list[str]:
    """The split's files in a fixed (sorted) order. split: 'train' or 'validation'. With
    data.holdout the validation documents come from the train files: see `split_parts`."""
    if spec.holdout is not None:
        split = "train"
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
    return open_text(path)


def check_local_file(spec: DataSpec, path: str) -> None:
    """Cheap upfront check (first record) so a wrong file fails with one line, before workers start."""
    if not path.startswith("hf://"):
        format_of(spec, path).check(spec, path)


def _is_blank(path: str) -> bool:
    """An empty or whitespace-only text file (JSON lines, plain text)."""
    return not path.endswith(".parquet") and text_blank(path)


def iter_file(spec: DataSpec, path: str, start: int = 0, batch_size: int = 1000,
              stop: int | None = None) -> Iterator[tuple[int, str]]:
    """(record index, text) for records in [start, stop) of one file; blank documents are dropped
    (but still counted, so record indices are stable positions for resuming)."""
    fmt = format_of(spec, path)
    if not path.startswith("hf://") and fmt.blank(path):
        return  # datasets' json builder fails obscurely on an empty file; an empty split is ours to report
    field = fmt.field(spec)
    try:
        idx = 0
        for batch in fmt.batches(spec, path, batch_size):
            if field not in batch:
                raise ConfigError(f"{path!r}: records lack a string field data.text_field={field!r}")
            texts = batch[field]
            n = len(texts)
            if idx + n <= start:
                idx += n
                continue
            for j in range(max(0, start - idx), n if stop is None else min(n, stop - idx)):
                t = texts[j]
                if isinstance(t, str) and t.strip():
                    yield idx + j, t
            idx += n
            if stop is not None and idx >= stop:
                return
    except ConfigError:
        raise
    except Exception as e:
        if path.startswith("hf://") and isinstance(e, (OSError, ConnectionError)):
            raise ConfigError(f"cannot stream {path} from the Hugging Face hub [{first_line(e)}]; {local_option(spec)}") from None
        raise ConfigError(f"cannot read {path!r} as {fmt.name}: {first_line(e)}") from None


@dataclass(frozen=True)
class Part:
    """Records [start, stop) of one file (stop None = to its end): a split is a list of them."""

    path: str
    start: int = 0
    stop: int | None = None


@functools.lru_cache(maxsize=16)
def holdout_boundary(spec: DataSpec) -> tuple[tuple[str, ...], int, int]:
    """(train files, k, r): the first `data.holdout` documents of the train files (sorted, in file
    order) are files[:k] and records [0, r) of files[k]. The same for every process and run."""
    files = resolve_files(spec, "train")
    want, seen = spec.holdout, 0
    for k, path in enumerate(files):
        check_local_file(spec, path)
        for rec, _ in iter_file(spec, path):
            seen += 1
            if seen == want:
                return tuple(files), k, rec + 1
    raise ConfigError(f"data.holdout={want} is larger than the train split ({seen} documents in "
                      f"{len(files)} files); accepted: fewer documents than that")


def split_parts(spec: DataSpec, split: str) -> list[Part]:
    """The split's documents as parts of files, in order; with data.holdout the validation split
    is the held-out head of the train files and the train split is the rest."""
    if spec.holdout is None:
        return [Part(f) for f in resolve_files(spec, split)]
    files, k, r = holdout_boundary(spec)
    if split == "validation":
        return [Part(f) for f in files[:k]] + [Part(files[k], 0, r)]
    return [Part(files[k], r)] + [Part(f) for f in files[k + 1:]]


def iter_part(spec: DataSpec, part: Part, start: int = 0) -> Iterator[tuple[int, str]]:
    """`iter_file` of a part: records >= start within it."""
    return iter_file(spec, part.path, start=max(start, part.start), stop=part.stop)


def split_texts(spec: DataSpec, split: str) -> Iterator[str]:
    """Every document text of the split, in file order."""
    for part in split_parts(spec, split):
        for _, text in iter_part(spec, part):
            yield text
