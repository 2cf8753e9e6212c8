"""The fixed validation set."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from test_data_helpers import write_docs  # noqa: E402  (sets HF offline env first)

import pytest
import torch
from omegaconf import OmegaConf

from dlr.data import data_spec, load_tokenizer, validation_batches

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("t5")


def _rows(batches):
    return torch.cat([b["input_ids"] for b in batches]), torch.cat([b["labels"] for b in batches])


@pytest.mark.parametrize("mode", ["paper", "packed"])
def test_union_over_ranks_is_identical(tok, tmp_path, mode):
    p = write_docs(tmp_path / "val.json.gz", 50)
    spec = data_spec({"source": "json", "validation_files": str(p), "seq_len": 16, "mode": mode, "val_tokens": 300})
    ref_x, ref_y = _rows(validation_batches(spec, tok, 4))
    assert int((ref_y != -100).sum()) == 300  # the budget, exactly
    for W in (2, 3):
        parts = [_rows(validation_batches(spec, tok, 4, r, W)) for r in range(W)]
        rows = [tuple(x) for xs, _ in parts for x in xs.tolist()]
        assert sorted(rows) == sorted(tuple(x) for x in ref_x.tolist())
        assert sum(xs.shape[0] for xs, _ in parts) == ref_x.shape[0]
        assert sum(int((ys != -100).sum()) for _, ys in parts) == 300


def test_paper_rows_are_documents_in_order(tok, tmp_path):
    p = write_docs(tmp_path / "val.json", 20)
    spec = data_spec({"source": "json", "validation_files": str(p), "seq_len": 16, "val_tokens": None})
    x, y = _rows(validation_batches(spec, tok, 7))
    assert x.shape == (20, 16)
    texts = [f"doc{i}x " + " ".join(["the cat sat"] * (1 + (i * 7) % 11)) for i in range(20)]
    for row, lab, ids in zip(x.tolist(), y.tolist(), tok.encode_batch(texts)):
        want = ids[:15] + [tok.eos_id]
        assert row[: len(want)] == want and lab[: len(want)] == want and set(lab[len(want):]) <= {-100}


def test_packed_rows_are_the_concatenated_stream(tok, tmp_path):
    p = write_docs(tmp_path / "val.json", 20)
    spec = data_spec({"source": "json", "validation_files": str(p), "seq_len": 16, "mode": "packed", "val_tokens": 100})
    x, y = _rows(validation_batches(spec, tok, 3))
    texts = [f"doc{i}x " + " ".join(["the cat sat"] * (1 + (i * 7) % 11)) for i in range(20)]
    stream = [t for ids in tok.encode_batch(texts) for t in ids + [tok.eos_id]][:100]
    assert x.shape == (7, 16)  # ceil(100 / 16); the last window is padded, labels -100 there
    assert y.flatten()[:100].tolist() == stream and (y.flatten()[100:] == -100).all()


def test_bundled_sample_validation(tok):
    spec = dataclasses.replace(data_spec(OmegaConf.load(CONFIGS / "c4_sample.yaml")), val_tokens=20_000)
    batches = validation_batches(spec, tok, 32)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == 20_000
    assert all(b["input_ids"].shape[1] == 256 for b in batches)
    whole = validation_batches(dataclasses.replace(spec, val_tokens=None, mode="packed"), tok, 32)
    # The whole bundled split: 88,407 T5 tokens + one EOS per document (200).
    assert sum(int((b["labels"] != -100).sum()) for b in whole) == 88_407 + 200
