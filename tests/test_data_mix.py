"""Mixtures of sources (data.source=mix): proportions, order independent of processes and workers,
exact resume (also on another process count), a source that runs out, the tokens per source."""
from __future__ import annotations

import json
import logging
from collections import Counter

from test_data_helpers import doc_ids, roundtrip, write_docs  # noqa: E402  (sets HF offline env first)

import pytest
import torch

from dlr.data import data_spec, train_batches, validation_rows
from dlr.data.mixture import MixStream
from dlr.errors import ConfigError

A, B_START, B_DOCS = 90, 1000, 30  # source a: docs 0..89 in 3 files; source b: docs 1000..1029 in 1


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    for k in range(3):
        write_docs(d / f"a-{k}.json.gz", 30, start=30 * k)
    write_docs(d / "b-0.json.gz", B_DOCS, start=B_START)
    write_docs(d / "a-val.json.gz", 20, start=5000)
    write_docs(d / "b-val.json.gz", 20, start=6000)
    return d


def mix_spec(d, wa=0.7, wb=0.3, **kw):
    cfg = {"source": "mix", "seq_len": 16, "shuffle_buffer": 8, "num_workers": 0, "val_tokens": 400,
           "mix": [{"label": "a", "weight": wa, "source": "json", "train_files": str(d / "a-*[0-9].json.gz"),
                    "validation_files": str(d / "a-val.json.gz")},
                   {"label": "b", "weight": wb, "source": "json", "train_files": str(d / "b-0.json.gz"),
                    "validation_files": str(d / "b-val.json.gz")}]}
    cfg.update(kw)
    return data_spec(cfg)


def test_realised_proportions_are_within_tolerance_of_the_weights(tok, docs):
    # 1600 documents at p=0.7: sd 0.0115, so 0.04 is 3.5 sd. The choice is a pure function of (seed, g).
    it = train_batches(mix_spec(docs), tok, 16, 0, 1, seed=4)
    ids = [i for _ in range(100) for i in doc_ids(next(it), tok)]
    share_a = sum(i < B_START for i in ids) / len(ids)
    assert abs(share_a - 0.7) < 0.04, share_a
    stream = MixStream(mix_spec(docs, wa=1, wb=3), seed=1)
    share_b = float(stream.choices(0).mean())
    assert abs(share_b - 0.75) < 0.03, share_b


def test_tokens_per_source_count_what_the_batches_hold(tok, docs):
    it = train_batches(mix_spec(docs), tok, 8, 0, 1, seed=2)
    per = Counter()
    for _ in range(12):
        b = next(it)
        for row, labels, i in zip(b["input_ids"], b["labels"], doc_ids(b, tok)):
            per["a" if i < B_START else "b"] += int((labels != -100).sum())
    assert it.source_names == ["a", "b"] and it.source_tokens() == [per["a"], per["b"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_global_step_does_not_depend_on_processes_or_workers(tok, docs, workers):
    W, B, steps = 3, 2, 25  # 150 documents: source b (30) cycles
    single = train_batches(mix_spec(docs, num_workers=0), tok, B * W, 0, 1, seed=9)
    ranks = [train_batches(mix_spec(docs, num_workers=workers), tok, B, r, W, seed=9) for r in range(W)]
    for _ in range(steps):
        want = sorted(doc_ids(next(single), tok))
        assert sorted(sum((doc_ids(next(it), tok) for it in ranks), [])) == want
    for it in ranks:
        it.close()


@pytest.mark.parametrize("mode,workers", [("paper", 0), ("packed", 0), ("paper", 2)])
def test_exact_resume_at_every_kill_point(tok, docs, mode, workers):
    s = mix_spec(docs, mode=mode, num_workers=workers)
    n = 24
    ref_it = train_batches(s, tok, 4, 0, 1, seed=11)
    ref = [next(ref_it) for _ in range(n)]
    ref_it.close()
    it = train_batches(s, tok, 4, 0, 1, seed=11)
    states = []
    for _ in range(n - 1):
        next(it)
        states.append(roundtrip(it.state_dict()))
    it.close()
    for k in range(0, n - 1, 1 if workers == 0 else 4):
        resumed = train_batches(s, tok, 4, 0, 1, seed=11)
        resumed.load_state_dict(states[k])
        for j in range(k + 1, min(n, k + 3)):
            assert torch.equal(next(resumed)["input_ids"], ref[j]["input_ids"]), (k, j)
        resumed.close()


def _global(its):
    positions = [it.local_position() for it in its]
    return roundtrip(its[0].global_state(positions))


def test_resume_on_another_process_count_twice(tok, docs):
    s = mix_spec(docs)
    ref = train_batches(s, tok, 6, 0, 1, seed=5)
    want = [sorted(doc_ids(next(ref), tok)) for _ in range(30)]
    three = [train_batches(s, tok, 2, r, 3, seed=5) for r in range(3)]
    got = [sorted(sum((doc_ids(next(it), tok) for it in three), [])) for _ in range(10)]
    state = _global(three)
    assert state["portable"] and sum(state["tokens"]) == sum(sum(it.source_tokens()) for it in three)
    one = train_batches(s, tok, 6, 0, 1, seed=5)
    one.restore(None, state)
    got += [sorted(doc_ids(next(one), tok)) for _ in range(10)]
    state = _global([one])
    two = [train_batches(s, tok, 3, r, 2, seed=5) for r in range(2)]
    for it in two:
        it.restore(None, state)
    got += [sorted(sum((doc_ids(next(it), tok) for it in two), [])) for _ in range(10)]
    assert got == want
    # The run's tokens per source carry over the resumes.
    assert sum(sum(it.source_tokens()) for it in two) == sum(int((b != -100).sum()) for b in [
        next(train_batches(s, tok, 180, 0, 1, seed=5))["labels"]])


def test_a_source_that_runs_out_cycles_or_stops_in_one_line(tok, docs, caplog):
    with caplog.at_level(logging.WARNING, logger="dlr.data.mixture"):
        it = train_batches(mix_spec(docs, wa=1, wb=1), tok, 10, 0, 1, seed=3)
        for _ in range(8):  # 80 documents: about 40 of b, which holds 30
            next(it)
    lines = [r.getMessage() for r in caplog.records if "'b' has handed out all its 30 documents" in r.getMessage()]
    assert len(lines) == 1 and "data.exhausted=cycle" in lines[0]
    it = train_batches(mix_spec(docs, wa=1, wb=1, exhausted="stop"), tok, 10, 0, 1, seed=3)
    with pytest.raises(ConfigError) as e:
        for _ in range(8):
            next(it)
    assert "'b' has handed out all its 30 documents" in str(e.value) and "\n" not in str(e.value)


def test_validation_is_each_source_by_weight(tok, docs):
    rows = validation_rows(mix_spec(docs), tok)[1]
    a = validation_rows(data_spec({"source": "json", "validation_files": str(docs / "a-val.json.gz"), "seq_len": 16,
                                   "val_tokens": 280}), tok)[1]
    b = validation_rows(data_spec({"source": "json", "validation_files": str(docs / "b-val.json.gz"), "seq_len": 16,
                                   "val_tokens": 120}), tok)[1]
    assert torch.equal(rows, torch.cat([a, b])) and int((rows != -100).sum()) == 400


@pytest.mark.parametrize("mix,needle", [
    ([{"config": "c4_sample", "weight": 0}], "sum to 0.0"),
    ([{"config": "c4_sample", "weight": -1}], "data.mix"),
    ([{"config": "c4_sampel", "weight": 1}], "data.mix[].config='c4_sampel'"),
    ([{"config": "c4_sample", "weight": 1, "seq_len": 5}], "key 'seq_len' is not valid"),
    ([{"config": "c4_sample", "weight": 1}, {"config": "c4_sample", "weight": 1}], "two sources are called"),
    ([], "data.mix"),
])
def test_bad_mixtures_are_one_line(mix, needle):
    with pytest.raises(ConfigError) as e:
        data_spec({"source": "mix", "mix": mix})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_training_on_a_mixture_records_tokens_per_source(tmp_path):
    from test_train import cfg

    from dlr.train.loop import train

    out = tmp_path / "run"
    mix = "[{config:c4_sample,weight:0.7},{config:c4_sample,label:c4_again,weight:0.3}]"
    summary = train(cfg("data=mix", f"data.mix={mix}", "data.val_tokens=2000", "data.num_workers=0", "steps=2",
                        "method=lowrank", f"out_dir={out}"))
    on_disk = json.loads((out / "summary.json").read_text())
    tokens = on_disk["data_tokens"]
    assert set(tokens) == {"c4_sample", "c4_again"} and tokens == summary["data_tokens"]
    assert 0 < tokens["c4_again"] < tokens["c4_sample"]  # 16 documents drawn 0.7 / 0.3
    card = (out / "final" / "README.md").read_text()
    assert f"Tokens per data source: `c4_sample` {tokens['c4_sample']:,}, `c4_again` {tokens['c4_again']:,}." in card


def test_prepare_writes_the_mixture_in_its_order_and_resumes(tok, docs, tmp_path, monkeypatch):
    from dlr.data import prepare_mix
    from dlr.data.prepare import MIX_SEED, prepare
    from dlr.data.shards import SplitShards

    monkeypatch.setattr(prepare_mix, "SHARD_DOCS", 2000)  # 3 shards for 5000 documents
    s = mix_spec(docs)
    out = tmp_path / "tokens"
    manifest = prepare(s, out, documents=5000, progress=False)
    assert manifest["mix"]["weights"] == {"a": 0.7, "b": 0.3}
    train = manifest["splits"]["train"]
    assert train["documents"] == 5000 and [sh["documents"] for sh in train["shards"]] == [2000, 2000, 1000]
    assert sum(manifest["mix"]["train_tokens"].values()) == train["tokens"]
    cursor = iter(MixStream(s, MIX_SEED).cursor(None))
    want = tok.encode_batch([next(cursor)[1] for _ in range(5000)])
    assert [list(d) for d in SplitShards(str(out), "train").iter_documents()] == want

    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "manifest.json"}
    for name in ("manifest.json", "train-00001.json", "train-00002.json", "train-00002.bin"):
        (out / name).unlink()
    again = prepare(s, out, documents=5000, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "manifest.json"} == before
    assert again["splits"] == manifest["splits"] and again["mix"] == manifest["mix"]

    prepared = data_spec({"source": "tokens", "path": str(out), "seq_len": 16, "val_tokens": 400, "tokenizer": "t5"})
    for x, y in zip(validation_rows(prepared, tok), validation_rows(s, tok)):
        assert torch.equal(x, y)
    assert next(train_batches(prepared, tok, 4, 0, 1, seed=0))["input_ids"].shape == (4, 16)
