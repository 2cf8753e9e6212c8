"""Process sharding by files (`split_dataset_by_node`'s rule, checked against datasets) and its example-wise fallback."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from test_data_helpers import doc_ids, roundtrip, spec_for, write_docs  # noqa: E402  (sets HF offline env first)

import pytest
import torch
from omegaconf import OmegaConf

import dlr.data.stream as stream_mod
from dlr.data import data_spec, train_batches
from dlr.data.batching import split_mode
from dlr.errors import ConfigError

N_FILES, PER_FILE = 6, 10
N_DOCS = N_FILES * PER_FILE
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("c4shards")
    # Equal sizes, so every process's epoch is a whole number of batches for the sizes used here.
    for k in range(N_FILES):
        write_docs(d / f"c4-train.{k:05d}-of-{N_FILES:05d}.json.gz", PER_FILE, start=k * PER_FILE)
    return d


def file_of(doc: int) -> int:
    return doc // PER_FILE


def test_split_mode_rule():
    assert split_mode(1, 1) == split_mode(5, 1) == "files"
    assert split_mode(6, 2) == split_mode(6, 3) == split_mode(6, 6) == "files"
    assert split_mode(6, 4) == split_mode(1, 2) == split_mode(3, 6) == "documents"


def test_bundled_single_file_sample_splits_by_documents(tok):
    spec = data_spec(OmegaConf.load(CONFIGS / "c4_sample.yaml"))
    assert train_batches(spec, tok, 2, 1, 2, 0).split == "documents"
    assert train_batches(spec, tok, 2, 0, 1, 0).split == "files"


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (3, 0), (2, 2)])
def test_file_shards_cover_each_document_once_per_epoch(tok, docs, world_size, num_workers):
    B = 2
    steps = N_DOCS // (world_size * B)  # one epoch of each process
    per_epoch = [Counter(), Counter()]
    files_of_rank = {}
    for rank in range(world_size):
        it = train_batches(spec_for(docs, num_workers=num_workers), tok, B, rank, world_size, seed=5)
        assert it.split == "files"
        for epoch in range(2):
            got = sum((doc_ids(next(it), tok) for _ in range(steps)), [])
            per_epoch[epoch].update(got)
            files_of_rank[rank, epoch] = {file_of(d) for d in got}
            assert len(files_of_rank[rank, epoch]) == N_FILES // world_size  # whole files, nobody else's
        it.close()
    for seen in per_epoch:
        assert sorted(seen) == list(range(N_DOCS)) and set(seen.values()) == {1}
    # The files are dealt out anew each epoch.
    assert any(files_of_rank[r, 0] != files_of_rank[r, 1] for r in range(world_size))


def test_each_process_opens_only_its_files(tok, docs, monkeypatch):
    opened: list[str] = []
    real = stream_mod.iter_part

    def spy(spec, part, start=0):
        opened.append(Path(part.path).name)
        return real(spec, part, start=start)

    monkeypatch.setattr(stream_mod, "iter_part", spy)

    def files_opened(world_size: int, rank: int, batch_size: int) -> set[str]:
        opened.clear()
        it = train_batches(spec_for(docs), tok, batch_size, rank, world_size, seed=3)
        for _ in range(N_DOCS // (world_size * batch_size)):  # exactly one epoch
            next(it)
        return set(opened)

    shards = [files_opened(2, r, 3) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == N_FILES // 2 and not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == N_FILES
    # Example-wise fallback (6 files over 4 processes): every process reads every file.
    assert len(files_opened(4, 1, 3)) == N_FILES


@pytest.mark.parametrize("world_size", [4, 5])
def test_indivisible_world_size_falls_back_to_document_split(tok, docs, world_size):
    B = 3 if world_size == 4 else 4
    steps = N_DOCS // (world_size * B)
    seen = Counter()
    for rank in range(world_size):
        it = train_batches(spec_for(docs), tok, B, rank, world_size, seed=5)
        assert it.split == "documents"
        for _ in range(steps):
            seen.update(doc_ids(next(it), tok))
    assert sorted(seen) == list(range(N_DOCS)) and set(seen.values()) == {1}


@pytest.mark.parametrize("mode,num_workers,before", [
    ("paper", 0, 7), ("paper", 2, 12), ("packed", 1, 7), ("packed", 0, 12),
])
def test_file_shard_resume_equals_uninterrupted(tok, docs, mode, num_workers, before):
    # 30 documents per process and epoch, B=3: 10 batches per epoch in paper mode. Saving after
    # 7 resumes mid-epoch and then crosses the boundary; after 12 the state is in epoch 1.
    spec = spec_for(docs, mode=mode, num_workers=num_workers)
    B, after, rank, world = 3, 10, 1, 2
    ref_it = train_batches(spec, tok, B, rank, world, seed=11)
    ref = [next(ref_it) for _ in range(before + after)]
    ref_it.close()

    it = train_batches(spec, tok, B, rank, world, seed=11)
    assert it.split == "files"
    for i in range(before):
        assert torch.equal(next(it)["input_ids"], ref[i]["input_ids"])
    state = roundtrip(it.state_dict())
    it.close()
    assert state["config"]["split"] == "files"

    resumed = train_batches(spec, tok, B, rank, world, seed=11)
    resumed.load_state_dict(state)
    for i in range(before, before + after):
        b = next(resumed)
        assert torch.equal(b["input_ids"], ref[i]["input_ids"]), i
        assert torch.equal(b["labels"], ref[i]["labels"]), i
    resumed.close()


def _state(docs, tok, rank, world):
    it = train_batches(spec_for(docs), tok, 3, rank, world, seed=1)
    next(it)
    return it.state_dict()


def test_resume_with_another_split_mode_is_refused(tok, docs):
    state = _state(docs, tok, 0, 2)
    it = train_batches(spec_for(docs), tok, 3, 0, 2, seed=1)
    wrong = {**state, "config": {**state["config"], "split": "documents"}}
    with pytest.raises(ConfigError, match="divided over processes by files now but by documents") as e:
        it.load_state_dict(wrong)
    assert "\n" not in str(e.value)
    # An older data state (version 1) is refused, naming the version found and the one read.
    v1 = {**state, "version": 1, "config": {k: v for k, v in state["config"].items() if k != "split"}}
    with pytest.raises(ConfigError, match="data state version=1 is not valid; accepted: 2"):
        it.load_state_dict(v1)


def test_resume_with_another_world_size_names_it(tok, docs):
    state = _state(docs, tok, 0, 2)
    with pytest.raises(ConfigError, match="num_processes=4 now but 2 in the checkpoint"):
        train_batches(spec_for(docs), tok, 3, 0, 4, seed=1).load_state_dict(state)


def test_empty_file_shard_is_one_line(tok, tmp_path):
    write_docs(tmp_path / "c4-train.00000-of-00002.json", 4)
    (tmp_path / "c4-train.00001-of-00002.json").write_text("")
    spec = dataclasses.replace(spec_for(tmp_path, shuffle_buffer=0), train_files=(str(tmp_path / "c4-train.*.json"),))
    assert [doc_ids(next(train_batches(spec, tok, 2, 0, 2, 0)), tok)] == [[0, 1]]
    with pytest.raises(ConfigError, match="process_index=1 of num_processes=2 got train files with no documents") as e:
        next(train_batches(spec, tok, 2, 1, 2, 0))
    assert "\n" not in str(e.value)


def split_by_datasets(items: list, rank: int, world_size: int, per_item_sources: bool) -> list:
    """What `datasets.distributed.split_dataset_by_node` gives this rank of `items`, in order,
    with one data source per item (like one file each) or one source holding them all."""
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    def gen(sources):
        for source in sources:
            yield from ({"item": x} for x in source)

    sources = [[x] for x in items] if per_item_sources else [items]
    ds = IterableDataset.from_generator(gen, gen_kwargs={"sources": sources})  # one shard per list entry
    return [ex["item"] for ex in split_dataset_by_node(ds, rank=rank, world_size=world_size)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_file_split_matches_split_dataset_by_node(docs, world_size):
    # datasets gives rank r the data sources r, r + world, ... when they divide evenly; ours
    # applies that rule to each epoch's seeded file permutation.
    spec = spec_for(docs)
    files = sorted(str(p) for p in docs.glob("c4-train.*.json.gz"))
    for epoch in range(2):
        order = stream_mod.DocStream(spec, files, seed=5).file_order(epoch)
        for rank in range(world_size):
            ours = stream_mod.DocStream(spec, files, seed=5, shard=rank, num_shards=world_size).file_order(epoch)
            assert ours == split_by_datasets(order, rank, world_size, per_item_sources=True)


@pytest.mark.parametrize("world_size", [4, 5])
def test_document_split_matches_split_dataset_by_node(tok, docs, world_size):
    # When the files do not divide, datasets keeps example i on rank i % world; ours keeps the
    # same documents of the same global stream (the one-process stream), in the same order.
    B = 2
    steps = N_DOCS // (world_size * B)
    one = train_batches(spec_for(docs), tok, B, 0, 1, seed=5)
    stream = sum((doc_ids(next(one), tok) for _ in range(N_DOCS // B)), [])
    one.close()
    for rank in range(world_size):
        it = train_batches(spec_for(docs), tok, B, rank, world_size, seed=5)
        assert it.split == "documents"
        ours = sum((doc_ids(next(it), tok) for _ in range(steps)), [])
        it.close()
        assert ours == split_by_datasets(stream, rank, world_size, per_item_sources=False)[: len(ours)]
