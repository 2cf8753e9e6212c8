"""Sharding over processes/workers and exact resume."""
from __future__ import annotations

from collections import Counter

from test_data_helpers import doc_ids, roundtrip, spec_for, write_docs  # noqa: E402  (sets HF offline env first)

import pytest
import torch

from dlr.data import data_spec, train_batches
from dlr.errors import ConfigError

N_DOCS = 60


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("c4")
    # Five files of unequal size: 5 is divisible by neither 2 nor 3, so these tests exercise the
    # example-wise split (file sharding is in test_data_shards.py).
    start = 0
    for k, n in enumerate((15, 10, 14, 11, 10)):
        write_docs(d / f"c4-train.{k:05d}-of-00005.json.gz", n, start=start)
        start += n
    assert start == N_DOCS
    return d


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (3, 0), (2, 2), (3, 1)])
def test_each_document_exactly_once_per_epoch(tok, docs, world_size, num_workers):
    B = 2
    steps = N_DOCS // (world_size * B)  # one epoch
    seen = Counter()
    for rank in range(world_size):
        it = train_batches(spec_for(docs, num_workers=num_workers), tok, B, rank, world_size, seed=5)
        for _ in range(steps):
            seen.update(doc_ids(next(it), tok))
        it.close()
    assert sorted(seen) == list(range(N_DOCS)) and set(seen.values()) == {1}


def test_global_step_union_matches_single_process(tok, docs):
    W, B, steps = 3, 2, 14  # crosses the epoch boundary (60 docs / 6 per step)
    single = train_batches(spec_for(docs), tok, B * W, 0, 1, seed=9)
    ranks = [train_batches(spec_for(docs), tok, B, r, W, seed=9) for r in range(W)]
    for _ in range(steps):
        want = sorted(doc_ids(next(single), tok))
        got = sorted(sum((doc_ids(next(it), tok) for it in ranks), []))
        assert got == want


def test_paper_batches_do_not_depend_on_num_workers(tok, docs):
    a = train_batches(spec_for(docs, num_workers=0), tok, 4, 0, 1, seed=2)
    b = train_batches(spec_for(docs, num_workers=2), tok, 4, 0, 1, seed=2)
    for _ in range(20):
        x, y = next(a), next(b)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    b.close()


@pytest.mark.parametrize("mode,num_workers,world_size", [
    ("paper", 0, 1), ("packed", 0, 1), ("paper", 2, 1), ("packed", 2, 1), ("paper", 0, 2), ("packed", 1, 2),
])
def test_resume_equals_uninterrupted(tok, docs, mode, num_workers, world_size):
    spec = spec_for(docs, mode=mode, num_workers=num_workers)
    B, before, after = 3, 7, 9  # 16 batches cross an epoch boundary
    rank = world_size - 1
    ref_it = train_batches(spec, tok, B, rank, world_size, seed=11)
    ref = [next(ref_it) for _ in range(before + after)]
    ref_it.close()

    it = train_batches(spec, tok, B, rank, world_size, seed=11)
    for i in range(before):
        assert torch.equal(next(it)["input_ids"], ref[i]["input_ids"])
    state = roundtrip(it.state_dict())
    it.close()

    resumed = train_batches(spec, tok, B, rank, world_size, seed=11)
    resumed.load_state_dict(state)
    for i in range(before, before + after):
        b = next(resumed)
        assert torch.equal(b["input_ids"], ref[i]["input_ids"]), i
        assert torch.equal(b["labels"], ref[i]["labels"]), i
    # A second save/restore from the resumed stream also continues exactly.
    state2 = resumed.state_dict()
    resumed.close()
    assert state2["batches"] == before + after


def test_a_data_state_that_names_the_processes_rank_and_world_size_resumes_exactly(tok, docs):
    """Data states written by earlier dlr name the process keys `rank` / `world_size`."""
    spec = spec_for(docs, mode="packed")  # packed: no process-count-free position to fall back on
    ref_it = train_batches(spec, tok, 3, 1, 2, seed=11)
    ref = [next(ref_it)["input_ids"] for _ in range(9)]
    ref_it.close()
    it = train_batches(spec, tok, 3, 1, 2, seed=11)
    for _ in range(5):
        next(it)
    state, run = roundtrip(it.state_dict()), roundtrip(it.global_state([it.local_position()] * 2))
    it.close()
    names = {"process_index": "rank", "num_processes": "world_size"}
    old = {**state, "config": {names.get(k, k): v for k, v in state["config"].items()}}
    assert {"rank", "world_size"} <= set(old["config"]) and not run["portable"]
    resumed = train_batches(spec, tok, 3, 1, 2, seed=11)
    resumed.restore(old, run)
    assert all(torch.equal(next(resumed)["input_ids"], ref[i]) for i in range(5, 9))
    resumed.close()


def test_resume_in_place_rewinds(tok, docs):
    it = train_batches(spec_for(docs), tok, 4, 0, 1, seed=1)
    next(it)
    state = it.state_dict()
    a = [next(it)["input_ids"] for _ in range(3)]
    it.load_state_dict(state)
    b = [next(it)["input_ids"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_resume_with_other_settings_is_refused(tok, docs):
    it = train_batches(spec_for(docs), tok, 4, 0, 1, seed=1)
    next(it)
    state = it.state_dict()
    other = train_batches(spec_for(docs), tok, 8, 0, 1, seed=1)
    with pytest.raises(ConfigError, match="batch_size=8 now but 4 in the checkpoint"):
        other.load_state_dict(state)


def test_more_processes_than_documents(tok, tmp_path):
    p = write_docs(tmp_path / "few.json", 2)
    spec = data_spec({"source": "json", "train_files": str(p), "seq_len": 16, "num_workers": 0})
    with pytest.raises(ConfigError, match="2 documents, fewer than num_processes=3"):
        next(train_batches(spec, tok, 1, 2, 3, 0))
