"""Shared helpers for the data tests (no tests here; a test_data* name because the data tests own only those paths)."""
from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DOC_RE = re.compile(r"doc(\d+)x")


def write_docs(path: Path, n: int, start: int = 0) -> Path:
    """n JSON-lines C4-style docs "docIx ..." of varied length (some longer than seq_len 16)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i in range(start, start + n):
            text = f"doc{i}x " + " ".join(["the cat sat"] * (1 + (i * 7) % 11))
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")
    return path


def doc_ids(batch, tok) -> list[int]:
    """The document id at the start of each (paper-mode) row."""
    out = []
    for row in batch["input_ids"].tolist():
        m = DOC_RE.match(tok.decode(row[:6]).replace(" ", ""))
        assert m, tok.decode(row[:6])
        out.append(int(m.group(1)))
    return out


def spec_for(docs: Path, **kw):
    """A DataSpec over the c4-train.*.json.gz shards written into `docs` (tiny seq_len)."""
    from dlr.data import data_spec

    cfg = {"source": "json", "train_files": str(docs / "c4-train.*.json.gz"), "seq_len": 16,
           "shuffle_buffer": 8, "num_workers": 0}
    cfg.update(kw)
    return data_spec(cfg)


def roundtrip(state):
    """What a checkpoint does to a data state: torch.save, then torch.load(weights_only=True)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def mount_hub(root: Path, monkeypatch) -> None:
    """Serve `hf://` from the local folder `root` (laid out as the Hub's datasets/<org>/<name>/...),
    so the real hub path (fsspec's hf:// URLs, the card's configs) runs offline."""
    import importlib

    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    class Mirror(DirFileSystem):
        protocol = "hf"

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem())

    # The fsspec package's `registry` attribute is a read-only view; the module holds the dict.
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "hf", Mirror)
