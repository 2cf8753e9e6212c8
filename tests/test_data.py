"""Specs, tokenizer, sources, batching modes and bad input."""
from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

from test_data_helpers import doc_ids, write_docs  # noqa: E402  (sets HF offline env first)

import pytest
import torch
from omegaconf import OmegaConf

from dlr.data import check_vocab, data_spec, load_tokenizer, resolve_files, train_batches, validation_batches
from dlr.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def local_spec(train, val=None, **kw):
    cfg = {"source": "json", "train_files": str(train), "validation_files": str(val or train), "seq_len": 16,
           "shuffle_buffer": 0, "num_workers": 0, "val_tokens": None}
    cfg.update(kw)
    return data_spec(cfg)


# --- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["c4", "c4_sample", "c4_local", "text"])
def test_configs_have_contract_keys(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for key in ("source", "path", "name", "train_files", "validation_files", "text_field", "tokenizer", "seq_len",
                "mode", "shuffle_buffer", "num_workers", "val_tokens"):
        assert key in cfg.keys(), key
    assert "/work/" not in (CONFIGS / f"{name}.yaml").read_text()


def test_c4_sample_config_resolves_bundled_files():
    spec = data_spec(OmegaConf.load(CONFIGS / "c4_sample.yaml"))
    assert spec.source == "json" and spec.seq_len == 256 and spec.mode == "paper"
    (train,), (val,) = resolve_files(spec, "train"), resolve_files(spec, "validation")
    assert train.endswith("c4-train.00000-of-00001.json.gz") and Path(train).is_file()
    assert val.endswith("c4-validation.00000-of-00001.json.gz")


def test_c4_local_requires_files():
    with pytest.raises(ConfigError, match="data.train_files is required"):
        data_spec(OmegaConf.load(CONFIGS / "c4_local.yaml"))


def test_hub_offline_error_is_one_line_and_names_local_option(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = data_spec(OmegaConf.load(CONFIGS / "c4.yaml"))
    with pytest.raises(ConfigError) as e:
        train_batches(spec, tok, 2, 0, 1, 0)
    msg = str(e.value)
    assert "\n" not in msg and "allenai/c4" in msg and "data=c4_sample" in msg and "c4_local" in msg


@pytest.mark.parametrize("key,value,match", [
    ("seq_len", 1, "data.seq_len=1"), ("mode", "chunked", "data.mode='chunked'"),
    ("source", "s3", "data.source='s3'"), ("shuffle_buffer", -1, "data.shuffle_buffer=-1"),
    ("val_tokens", 0, "data.val_tokens=0"), ("sample_by", "word", "data.sample_by='word'"),
])
def test_bad_values(key, value, match):
    cfg = {"source": "json", "train_files": "x.json", key: value}
    with pytest.raises(ConfigError, match=match) as e:
        data_spec(cfg)
    assert "\n" not in str(e.value) and "accepted" in str(e.value)


# --- tokenizer -------------------------------------------------------------------------------

def test_t5_tokenizer(tok, tmp_path):
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (32000, 0, 1)
    ids = tok.encode_batch(["The quick brown fox jumps over the lazy dog."])
    assert ids == [[37, 1704, 4216, 3, 20400, 4418, 7, 147, 8, 19743, 1782, 5]]
    tok.save(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again.encode_batch(["hello world"]) == tok.encode_batch(["hello world"])
    assert again.vocab_size == 32000


def test_check_vocab(tok):
    check_vocab(tok, 32000)
    check_vocab(tok, 32100)
    with pytest.raises(ConfigError, match="vocab_size=1000 .* 32000"):
        check_vocab(tok, 1000)


def test_bad_tokenizer_path():
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer("./no/such/spiece.model")


# --- bad input files -------------------------------------------------------------------------

def _first_batch(spec, tok):
    return next(train_batches(spec, tok, 2, 0, 1, 0))


def test_missing_path(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"path '.*nope\.json\.gz' does not exist"):
        _first_batch(local_spec(tmp_path / "nope.json.gz"), tok)


def test_empty_glob(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"glob '.*c4-\*\.json\.gz' matches no files"):
        _first_batch(local_spec(tmp_path / "c4-*.json.gz"), tok)


def test_not_json_lines(tok, tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("this is not json\n")
    with pytest.raises(ConfigError, match="bad.json' is not JSON lines") as e:
        _first_batch(local_spec(p), tok)
    assert "\n" not in str(e.value)


def test_gz_that_is_not_gzip(tok, tmp_path):
    p = tmp_path / "bad.json.gz"
    p.write_text('{"text": "plain"}\n')
    with pytest.raises(ConfigError, match="bad.json.gz"):
        _first_batch(local_spec(p), tok)


def test_lacks_text(tok, tmp_path):
    p = tmp_path / "notext.json"
    p.write_text('{"content": "hello", "url": "u"}\n')
    with pytest.raises(ConfigError, match="notext.json.*text_field='text'"):
        _first_batch(local_spec(p), tok)


def test_empty_split(tok, tmp_path):
    p = tmp_path / "empty.json.gz"
    with gzip.open(p, "wt") as f:
        f.write("")
    with pytest.raises(ConfigError, match="train split has no documents.*empty.json.gz"):
        _first_batch(local_spec(p), tok)
    with pytest.raises(ConfigError, match="validation split has no documents.*empty.json.gz"):
        validation_batches(local_spec(p), tok, 2)


def test_empty_split_with_workers_is_one_line(tok, tmp_path):
    p = tmp_path / "empty.json"
    p.write_text("")
    with pytest.raises(ConfigError) as e:
        _first_batch(local_spec(p, num_workers=1), tok)
    assert "no documents" in str(e.value) and "\n" not in str(e.value)


def test_bad_batch_size_and_process_index(tok, tmp_path):
    p = write_docs(tmp_path / "d.json", 10)
    with pytest.raises(ConfigError, match="batch_size=0"):
        train_batches(local_spec(p), tok, 0, 0, 1, 0)
    with pytest.raises(ConfigError, match="process_index=2, num_processes=2 are not valid"):
        train_batches(local_spec(p), tok, 1, 2, 2, 0)


# --- batching modes --------------------------------------------------------------------------

def test_paper_mode(tok, tmp_path):
    p = write_docs(tmp_path / "d.json.gz", 40)
    spec = local_spec(p)
    b = next(train_batches(spec, tok, 8, 0, 1, 0))
    x, y = b["input_ids"], b["labels"]
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert doc_ids(b, tok) == list(range(8))  # shuffle_buffer=0: file order
    texts = [f"doc{i}x " + " ".join(["the cat sat"] * (1 + (i * 7) % 11)) for i in range(8)]
    for row, lab, ids in zip(x.tolist(), y.tolist(), tok.encode_batch(texts)):
        want = ids[:15] + [tok.eos_id]
        assert row[: len(want)] == want
        assert all(t == tok.pad_id for t in row[len(want):])
        assert lab[: len(want)] == want and all(v == -100 for v in lab[len(want):])


def test_packed_mode(tok, tmp_path):
    p = write_docs(tmp_path / "d.json", 40)
    spec = local_spec(p, mode="packed")
    it = train_batches(spec, tok, 4, 0, 1, 0)
    got = torch.cat([next(it)["input_ids"].flatten() for _ in range(3)]).tolist()
    texts = [f"doc{i}x " + " ".join(["the cat sat"] * (1 + (i * 7) % 11)) for i in range(40)]
    stream = [t for ids in tok.encode_batch(texts) for t in ids + [tok.eos_id]]
    assert got == stream[: len(got)]
    b = next(it)
    assert torch.equal(b["input_ids"], b["labels"]) and (b["labels"] != -100).all()


def test_deterministic_and_seeded(tok, tmp_path):
    p = write_docs(tmp_path / "d.json", 60)
    spec = local_spec(p, shuffle_buffer=16)
    a = [doc_ids(next(it), tok) for it in [train_batches(spec, tok, 6, 0, 1, 3)] for _ in range(5)]
    b = [doc_ids(next(it), tok) for it in [train_batches(spec, tok, 6, 0, 1, 3)] for _ in range(5)]
    c = [doc_ids(next(it), tok) for it in [train_batches(spec, tok, 6, 0, 1, 4)] for _ in range(5)]
    assert a == b and a != c
    assert sorted(sum(a, [])) != sum(a, [])  # actually shuffled


def test_epochs_restart_with_new_order(tok, tmp_path):
    p = write_docs(tmp_path / "d.json", 12)
    it = train_batches(local_spec(p, shuffle_buffer=12), tok, 4, 0, 1, 0)
    e0 = sum((doc_ids(next(it), tok) for _ in range(3)), [])
    e1 = sum((doc_ids(next(it), tok) for _ in range(3)), [])
    assert sorted(e0) == sorted(e1) == list(range(12)) and e0 != e1


def test_multiple_files_are_shuffled_per_epoch(tok, tmp_path):
    for k in range(4):
        write_docs(tmp_path / f"c4-train.{k:05d}-of-00004.json.gz", 5, start=5 * k)
    it = train_batches(local_spec(tmp_path / "c4-train.*.json.gz", shuffle_buffer=3), tok, 5, 0, 1, 1)
    docs = [sum((doc_ids(next(it), tok) for _ in range(4)), []) for _ in range(3)]
    assert all(sorted(d) == list(range(20)) for d in docs)
    assert len({tuple(d) for d in docs}) == 3


def test_plain_text_source(tok, tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("doc0x first paragraph\nstill first\n\ndoc1x second\n\n\ndoc2x third\n")
    spec = data_spec({"source": "text", "train_files": str(p), "validation_files": str(p), "seq_len": 16,
                      "shuffle_buffer": 0, "num_workers": 0, "val_tokens": None})
    assert doc_ids(next(train_batches(spec, tok, 3, 0, 1, 0)), tok) == [0, 1, 2]
    by_line = dataclasses.replace(spec, sample_by="line")
    rows = validation_batches(by_line, tok, 10)[0]["input_ids"]
    assert rows.shape[0] == 4  # four non-blank lines


def test_bundled_sample_batches(tok):
    spec = dataclasses.replace(data_spec(OmegaConf.load(CONFIGS / "c4_sample.yaml")), num_workers=0, shuffle_buffer=100)
    b = next(train_batches(spec, tok, 4, 0, 1, 0))
    assert b["input_ids"].shape == (4, 256) and int(b["input_ids"].max()) < 32000
