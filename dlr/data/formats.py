"""How each kind of document file is read: one `Format` object per kind, declared once.

Training, the validation set, dlr-prepare and dlr-eval all read files through `format_of(spec,
path)`, so a new kind of file is one `Format` (in dlr, or in your own module, named by
`data.source=<module>:<NAME>`), and nothing else changes. The built-in ones let `datasets`
read the file (`load_dataset(<builder>, data_files=[path], streaming=True)`): JSON lines
(plain, .gz, .zst, ...), Parquet and plain text.

`source_kind(source)` answers what the evaluation asks of any data.source (is it a corpus scored
whole, can the sliding protocol read it, what describes it): a kind of file's answers come from
its `Format`, the other sources' (hub, tokens, mix) are declared here in `OTHER_SOURCES`.
"""
from __future__ import annotations

import functools
import importlib
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dlr.data.spec import DataSpec
from dlr.errors import ConfigError

# The compressions fsspec (and so `datasets`) opens by extension; .zst needs `zstandard`.
_COMPRESSED = (".gz", ".zst", ".bz2", ".xz")


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def open_text(path: str) -> io.TextIOBase:
    import fsspec

    # compression by extension (.gz, .zst, ...), as `datasets` opens the same file
    return fsspec.open(path, mode="rt", encoding="utf-8", compression="infer").open()


def text_blank(path: str) -> bool:
    try:
        with open_text(path) as f:
            return not any(line.strip() for line in f)
    except (OSError, UnicodeDecodeError, EOFError, ValueError):
        return False  # let the real reader report it


def _never_blank(path: str) -> bool:
    return False


def datasets_batches(builder: str, **kwargs: Any) -> Callable[[DataSpec, str, int], Iterable[Mapping[str, list]]]:
    """A `Format.batches` that streams one file with `datasets.load_dataset(builder, ...)`."""

    def batches(spec: DataSpec, path: str, batch_size: int) -> Iterable[Mapping[str, list]]:
        import datasets

        extra = {k: (v(spec) if callable(v) else v) for k, v in kwargs.items()}
        ds = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **extra)
        return ds.iter(batch_size=batch_size)

    return batches


@dataclass(frozen=True)
class Format:
    """A kind of document file.

    name: what messages call it; extensions: how a hub file or a directory entry is recognised;
    batches(spec, path, batch_size): the file's records, as {column: values} batches in file order;
    check(spec, path): a cheap look at a local file that raises a one-line ConfigError when it
    cannot be read as this format or lacks the text; field(spec): the column holding the text;
    blank(path): an empty file (whose split is then reported empty, not failed obscurely);
    whole_file_documents: a file is one running text (a corpus such as WikiText): dlr-eval reads
    each file as one document, scores all of it, and picks the sliding protocol for it;
    described_by: the data settings, beside the files, that say how it was read (dlr-eval reports them).
    """

    name: str
    extensions: tuple[str, ...]
    batches: Callable[[DataSpec, str, int], Iterable[Mapping[str, list]]]
    check: Callable[[DataSpec, str], None]
    field: Callable[[DataSpec], str] = lambda spec: spec.text_field
    blank: Callable[[str], bool] = _never_blank
    whole_file_documents: bool = False
    described_by: tuple[str, ...] = ()


def _lacks(path: str, spec: DataSpec, extra: str = "") -> ConfigError:
    return ConfigError(f"{path!r}: records lack a string field data.text_field={spec.text_field!r}{extra}")


def _check_json(spec: DataSpec, path: str) -> None:
    if path.endswith(".parquet"):
        raise ConfigError(f"{path!r} is Parquet but data.source={spec.source!r}; accepted: data.source=parquet")
    try:
        with open_text(path) as f:
            line = next((ln for ln in f if ln.strip()), "")
    except (OSError, UnicodeDecodeError, EOFError, ValueError) as e:
        raise ConfigError(f"cannot read {path!r} as JSON lines: {first_line(e)}") from None
    if not line:
        return  # an empty file; an empty *split* is reported when streaming finds no documents
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise ConfigError(f"{path!r} is not JSON lines (first line does not parse as JSON)") from None
    if not isinstance(record, dict) or not isinstance(record.get(spec.text_field), str):
        raise _lacks(path, spec)


def _check_parquet(spec: DataSpec, path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.endswith(".parquet"):
        raise ConfigError(f"{path!r} has an unknown format for data.source=parquet; accepted: *.parquet files")
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"cannot read {path!r} as Parquet: {first_line(e)}") from None
    col = schema.field(spec.text_field) if spec.text_field in schema.names else None
    if col is None or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise _lacks(path, spec, f" (columns: {', '.join(schema.names[:8])})")


def _check_text(spec: DataSpec, path: str) -> None:
    if path.endswith(".parquet"):
        raise ConfigError(f"{path!r} is Parquet but data.source={spec.source!r}; accepted: data.source=parquet")
    try:
        with open_text(path) as f:
            f.read(4096)
    except (OSError, UnicodeDecodeError, EOFError, ValueError) as e:
        raise ConfigError(f"cannot read {path!r} as text: {first_line(e)}") from None


JSON = Format("JSON lines", tuple(e + c for e in (".json", ".jsonl") for c in ("", *_COMPRESSED)),
              datasets_batches("json"), _check_json, blank=text_blank)
# Only the text column is read: FineWeb's rows carry a dozen others.
PARQUET = Format("Parquet", (".parquet",), datasets_batches("parquet", columns=lambda s: [s.text_field]), _check_parquet)
TEXT = Format("text", tuple(".txt" + c for c in ("", *_COMPRESSED)),
              datasets_batches("text", sample_by=lambda s: s.sample_by), _check_text, field=lambda spec: "text",
              blank=text_blank, whole_file_documents=True, described_by=("sample_by",))
FORMATS = {"json": JSON, "parquet": PARQUET, "text": TEXT}  # data.source -> Format


@dataclass(frozen=True)
class SourceKind:
    """What the evaluation asks of a data.source, so that dlr/eval names no source.

    corpus: running text scored whole (protocol=auto picks sliding, and a budget that leaves part
    of it unscored is refused); no_sliding: why protocol=sliding cannot read it ("" when it can);
    described_by: the data settings, beside the files, that say what was read; local_files: its
    validation files are local paths or globs (`resolve_files` lists them).
    """

    corpus: bool = False
    no_sliding: str = ""
    described_by: tuple[str, ...] = ()
    local_files: bool = True


# The data.sources that are not a kind of file; a kind of file's SourceKind comes from its Format.
OTHER_SOURCES = {
    "hub": SourceKind(described_by=("path", "name"), local_files=False),
    "tokens": SourceKind(no_sliding="holds prepared token shards", described_by=("path",), local_files=False),
    "mix": SourceKind(no_sliding="weighs its sources by rows", local_files=False),
}


@functools.lru_cache(maxsize=None)
def _declared(source: str) -> Format:
    module, _, name = source.partition(":")
    try:
        fmt = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.source={source!r}: cannot import it ({first_line(e)}); accepted: "
                          f"{', '.join(FORMATS)}, hub, or module:NAME of a dlr.data.Format") from None
    if not isinstance(fmt, Format):
        raise ConfigError(f"data.source={source!r} is a {type(fmt).__name__}, not a dlr.data.Format")
    return fmt


def format_of(spec: DataSpec, path: str) -> Format:
    """The format of one file: a hub file's by its extension, a local file's by data.source."""
    if spec.source in FORMATS:
        return FORMATS[spec.source]
    if spec.source != "hub":
        return _declared(spec.source)
    for fmt in FORMATS.values():
        if path.endswith(fmt.extensions):
            return fmt
    known = [e for f in FORMATS.values() for e in f.extensions if not e.endswith((".bz2", ".xz"))]
    raise ConfigError(f"hub file {path!r} has an unknown format; accepted: {', '.join(known)}")


def source_kind(source: str) -> SourceKind:
    """What data.source=`source` is, for the evaluation (a built-in name or a declared module:NAME)."""
    if source in OTHER_SOURCES:
        return OTHER_SOURCES[source]
    fmt = FORMATS[source] if source in FORMATS else _declared(source)
    return SourceKind(corpus=fmt.whole_file_documents, described_by=fmt.described_by)


def extensions_of(source: str) -> tuple[str, ...]:
    """The file names a directory given for data.source=`source` is listed by."""
    return FORMATS[source].extensions if source in FORMATS else _declared(source).extensions
