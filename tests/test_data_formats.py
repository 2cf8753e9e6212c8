"""Parquet, zstd JSON lines and held-out validation, offline: the bundled C4 sample rewritten in
each format inside the test, a directory-backed `hf` filesystem in a FineWeb-Edu layout, and
the ready hub configs' one-line refusal without network."""
from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from test_data_helpers import mount_hub, roundtrip  # noqa: E402  (sets HF offline env first)

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from omegaconf import OmegaConf

from dlr.data import data_spec, train_batches, validation_rows
from dlr.data.sources import resolve_files, split_texts
from dlr.errors import ConfigError

CONFIGS_DATA = Path(__file__).resolve().parents[1] / "configs" / "data"
SAMPLE = resources.files("dlr.assets").joinpath("c4_sample")


def _records(split: str) -> list[dict]:
    path = str(SAMPLE.joinpath(f"c4-{split}.00000-of-00001.json.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_zst(path: Path, records: list[dict]) -> Path:
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(body))
    return path


def write_parquet(path: Path, records: list[dict], text_field: str = "text") -> Path:
    # Several row groups and extra columns, like FineWeb's files.
    table = pa.table({"id": [str(i) for i in range(len(records))], text_field: [r["text"] for r in records],
                      "url": [r["url"] for r in records]})
    pq.write_table(table, path, row_group_size=300)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The sample's train split cut into 3 files, validation in 1, as .json.gz, .jsonl.zst and .parquet."""
    d = tmp_path_factory.mktemp("formats")
    train, val = _records("train"), _records("validation")
    cuts = [train[:700], train[700:1300], train[1300:]]
    for fmt in ("json.gz", "jsonl.zst", "parquet"):
        (d / fmt).mkdir()
        for k, recs in enumerate(cuts + [val]):
            name = f"{'validation' if k == 3 else 'train'}-{k}.{fmt}"
            if fmt == "json.gz":
                with gzip.open(d / fmt / name, "wt", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in recs)
            elif fmt == "jsonl.zst":
                write_zst(d / fmt / name, recs)
            else:
                write_parquet(d / fmt / name, recs)
    return d


def spec(corpus, fmt, **kw):
    cfg = {"source": "parquet" if fmt == "parquet" else "json", "train_files": str(corpus / fmt / f"train-*.{fmt}"),
           "validation_files": str(corpus / fmt / f"validation-*.{fmt}"), "seq_len": 64, "shuffle_buffer": 300,
           "num_workers": 0, "val_tokens": 5000}
    cfg.update(kw)
    if kw.get("holdout"):
        cfg.pop("validation_files")
    return data_spec(cfg)


def batches(s, tok, n, B=16, seed=3, rank=0, world=1):
    it = train_batches(s, tok, B, rank, world, seed)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def test_same_documents_in_any_format_give_the_same_batches(tok, corpus):
    # 120 batches of 16 cross the 1800-document epoch: the second epoch's order too.
    ref = batches(spec(corpus, "json.gz"), tok, 120)
    ref_val = validation_rows(spec(corpus, "json.gz"), tok)
    for fmt in ("jsonl.zst", "parquet"):
        got = batches(spec(corpus, fmt), tok, 120)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
                   for a, b in zip(ref, got)), fmt
        val = validation_rows(spec(corpus, fmt), tok)
        assert torch.equal(val[0], ref_val[0]) and torch.equal(val[1], ref_val[1]), fmt


@pytest.mark.parametrize("fmt,mode,workers", [("parquet", "paper", 0), ("jsonl.zst", "packed", 0), ("parquet", "paper", 2)])
def test_exact_resume_at_every_kill_point(tok, corpus, fmt, mode, workers):
    s = spec(corpus, fmt, mode=mode, num_workers=workers, shuffle_buffer=100)
    B, n = 64, 32  # 32 batches of 64 cross the epoch boundary (1800 documents)
    ref = batches(s, tok, n, B=B)
    it = train_batches(s, tok, B, 0, 1, 3)
    states = []
    for i in range(n - 1):
        next(it)
        states.append(roundtrip(it.state_dict()))
    it.close()
    for k in range(0, n - 1, 1 if workers == 0 else 5):  # every kill point (every 5th with workers: slower)
        resumed = train_batches(s, tok, B, 0, 1, 3)
        resumed.load_state_dict(states[k])
        for j in range(k + 1, min(n, k + 3)):
            assert torch.equal(next(resumed)["input_ids"], ref[j]["input_ids"]), (k, j)
        resumed.close()


def _rows(b):
    return {tuple(r) for r in b["input_ids"].tolist()}


def test_held_out_documents_are_validation_and_never_trained_on(tok, corpus):
    s = spec(corpus, "parquet", holdout=900, val_tokens=None)  # the first file (700) and 200 of the second
    held = list(split_texts(s, "validation"))
    train = _records("train")
    assert held == [r["text"] for r in train[:900]]
    held_rows = {tuple(r) for r in validation_rows(s, tok)[0].tolist()}
    assert len(held_rows) == 900
    seen = set()
    for b in batches(s, tok, 900 // 16 + 5, B=16):  # the whole train split (900 documents) and into epoch 2
        rows = _rows(b)
        assert not rows & held_rows
        seen |= rows
    every = {tuple(r) for r in validation_rows(spec(corpus, "parquet", validation_files=str(corpus / "parquet" / "train-*.parquet"), val_tokens=None), tok)[0].tolist()}
    assert seen == every - held_rows  # the rest of the corpus, all of it


@pytest.mark.parametrize("world", [2, 3])
def test_held_out_set_is_the_same_for_every_process_count(tok, corpus, world):
    s = spec(corpus, "jsonl.zst", holdout=250, val_tokens=None)
    held = {tuple(r) for r in validation_rows(s, tok)[0].tolist()}
    for rank in range(world):
        for b in batches(s, tok, 10, B=8, rank=rank, world=world):
            assert not _rows(b) & held


def test_bad_format_input_is_one_line(tok, corpus, tmp_path):
    nofield = write_parquet(tmp_path / "nofield.parquet", _records("validation")[:5], text_field="content")
    empty = tmp_path / "empty.jsonl.zst"
    write_zst(empty, [])
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    cases = [
        ({"source": "parquet", "train_files": str(nofield)}, "lack a string field data.text_field='text'"),
        ({"source": "json", "train_files": str(nofield)}, "is Parquet but data.source='json'"),
        ({"source": "parquet", "train_files": str(csv)}, "unknown format"),
        ({"source": "json", "train_files": str(empty)}, "no documents"),
        ({"source": "parquet", "train_files": str(corpus / "parquet" / "train-0.parquet"), "holdout": 701},
         "data.holdout=701 is larger than the train split (700 documents"),
        ({"source": "feather", "train_files": str(csv)}, "data.source='feather'"),
    ]
    for cfg, needle in cases:
        with pytest.raises(ConfigError) as e:
            it = train_batches(data_spec({"num_workers": 0, **cfg}), tok, 2, 0, 1, 0)
            next(it)
        msg = str(e.value)
        assert needle in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------- the hub, offline

CARD = """---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# FineWeb-Edu (mirror for tests)
"""


@pytest.fixture
def fineweb_mirror(tmp_path, monkeypatch, corpus):
    """HuggingFaceFW/fineweb-edu with its card and two sample/10BT Parquet files (the bundled
    sample's train split, cut in two), plus a decoy of another config."""
    repo = tmp_path / "hub" / "datasets" / "HuggingFaceFW" / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    train = _records("train")
    write_parquet(repo / "sample" / "10BT" / "000_00000.parquet", train[:1000])
    write_parquet(repo / "sample" / "10BT" / "001_00000.parquet", train[1000:])
    write_parquet(repo / "data" / "CC-MAIN-2024-10" / "train-00000-of-00001.parquet", train[:10])
    (repo / "README.md").write_text(CARD)
    mount_hub(tmp_path / "hub", monkeypatch)
    return repo


def test_fineweb_edu_config_and_a_card_config_name_pick_the_same_files(fineweb_mirror):
    want = [f"hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/00{k}_00000.parquet" for k in range(2)]
    ready = data_spec(OmegaConf.load(CONFIGS_DATA / "fineweb_edu.yaml"))
    assert resolve_files(ready, "train") == want
    by_name = data_spec({**OmegaConf.to_container(OmegaConf.load(CONFIGS_DATA / "hub.yaml")),
                         "path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"})
    assert resolve_files(by_name, "train") == want
    with pytest.raises(ConfigError, match="has no validation split; set data.holdout"):
        resolve_files(by_name, "validation")
    with pytest.raises(ConfigError, match="data.name='sample-1T' is not a config of hub dataset"):
        resolve_files(data_spec({"source": "hub", "path": "HuggingFaceFW/fineweb-edu", "name": "sample-1T"}), "train")


def test_fineweb_edu_streams_like_the_same_local_parquet(tok, fineweb_mirror):
    common = {"seq_len": 64, "num_workers": 0, "val_tokens": 3000, "holdout": 300, "shuffle_buffer": 200}
    hub = data_spec({**OmegaConf.to_container(OmegaConf.load(CONFIGS_DATA / "fineweb_edu.yaml")), **common})
    local = data_spec({"source": "parquet", "train_files": str(fineweb_mirror / "sample" / "10BT" / "*.parquet"), **common})
    for a, b in zip(batches(hub, tok, 8), batches(local, tok, 8)):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(validation_rows(hub, tok)[0], validation_rows(local, tok)[0])


@pytest.mark.parametrize("name", ["fineweb_edu", "fineweb", "dclm", "slimpajama", "mix"])
def test_ready_hub_configs_offline_fail_at_once_in_one_line(tok, name):
    s = data_spec(OmegaConf.load(CONFIGS_DATA / f"{name}.yaml"))
    with pytest.raises(ConfigError) as e:
        train_batches(s, tok, 2, 0, 1, 0)
    msg = str(e.value)
    assert "cannot reach the Hugging Face hub" in msg and "without internet" in msg and "\n" not in msg, msg


def test_prepare_and_eval_use_the_same_held_out_documents(tok, corpus, tmp_path):
    from dlr.data.prepare import prepare
    from dlr.data.shards import SplitShards
    from dlr.eval.corpus import load_corpus

    s = spec(corpus, "jsonl.zst", holdout=900, val_tokens=None)
    manifest = prepare(s, tmp_path / "tokens", progress=False)
    train = [r["text"] for r in _records("train")]
    assert manifest["splits"]["validation"]["documents"] == 900 and manifest["splits"]["train"]["documents"] == 900
    stored = [list(d) for d in SplitShards(str(tmp_path / "tokens"), "validation").iter_documents()]
    assert stored == tok.encode_batch(train[:900])
    assert [list(d) for d in SplitShards(str(tmp_path / "tokens"), "train").iter_documents()] == tok.encode_batch(train[900:])
    prepared = data_spec({"source": "tokens", "path": str(tmp_path / "tokens"), "seq_len": 64, "val_tokens": None,
                          "tokenizer": "t5"})
    assert torch.equal(validation_rows(prepared, tok)[0], validation_rows(s, tok)[0])
    assert load_corpus(s, tok).documents == 900  # dlr-eval's sliding protocol reads the same documents
