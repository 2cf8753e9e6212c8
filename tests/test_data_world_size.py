"""The data position in process-count-independent terms: 2 processes -> 3 -> 1 continue the same global batches."""
from __future__ import annotations

import json

from test_data_helpers import doc_ids, spec_for, write_docs  # noqa: E402  (sets HF offline env first)

import pytest

from dlr.data import train_batches
from dlr.errors import ConfigError

N_FILES, PER_FILE, GLOBAL = 7, 10, 6  # 7 files: 2 and 3 processes deal out documents


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("c4ws")
    for k in range(N_FILES):
        write_docs(d / f"c4-train.{k:05d}-of-{N_FILES:05d}.json.gz", PER_FILE, start=k * PER_FILE)
    return d


def processes(spec, tok, world):
    return [train_batches(spec, tok, GLOBAL // world, rank, world, seed=3) for rank in range(world)]


def global_step(its, tok) -> list[int]:
    """The documents of one optimizer step: every process's micro-batch, in rank order."""
    return sorted(d for it in its for d in doc_ids(next(it), tok))


def checkpoint(its) -> dict:
    """What dlr-train writes to data.json (through JSON, as on disk)."""
    state = its[0].global_state([it.local_position() for it in its])
    for it in its:
        it.close()
    return json.loads(json.dumps(state))


def test_two_then_three_then_one_processes_continue_the_same_global_batches(tok, docs):
    spec = spec_for(docs)
    ref = processes(spec, tok, 2)
    expected = [global_step(ref, tok) for _ in range(9)]
    assert len({d for step in expected for d in step}) == 9 * GLOBAL  # no document twice

    its = processes(spec, tok, 2)
    got = [global_step(its, tok) for _ in range(3)]
    state = checkpoint(its)
    assert state["portable"] and state["position"]["g"] == 3 * GLOBAL
    its = processes(spec_for(docs, num_workers=2), tok, 3)  # other processes, micro-batch and workers
    for it in its:
        it.restore(None, state)
    got += [global_step(its, tok) for _ in range(3)]
    state = checkpoint(its)
    its = processes(spec, tok, 1)
    its[0].restore(None, state)
    got += [global_step(its, tok) for _ in range(3)]
    assert got == expected


def test_same_processes_use_their_own_exact_state(tok, docs):
    spec = spec_for(docs, mode="packed")
    its = processes(spec, tok, 2)
    for _ in range(2):
        for it in its:
            next(it)
    own = [json.loads(json.dumps(it.state_dict())) for it in its]
    state = checkpoint(its)
    assert not state["portable"]  # packed: each process has its own token buffer
    ref = processes(spec, tok, 2)
    for _ in range(3):
        expected = [next(it)["input_ids"].tolist() for it in ref]
    resumed = processes(spec, tok, 2)
    for it, mine in zip(resumed, own):
        it.restore(mine, state)
    assert [next(it)["input_ids"].tolist() for it in resumed] == expected


@pytest.mark.parametrize("kind", ["packed", "file_split"])
def test_non_portable_position_on_another_world_size_is_one_line(tok, docs, tmp_path, kind):
    if kind == "packed":
        spec, world = spec_for(docs, mode="packed"), 2
    else:  # 6 files over 2 processes: each reads its own files, an order of its own
        for k in range(6):
            write_docs(tmp_path / f"c4-train.{k:05d}-of-00006.json.gz", PER_FILE, start=k * PER_FILE)
        spec, world = spec_for(tmp_path), 2
    its = processes(spec, tok, world)
    [next(it) for it in its]
    state = checkpoint(its)
    assert not state["portable"]
    with pytest.raises(ConfigError, match="resume with 2 processes") as e:
        processes(spec, tok, 1)[0].restore(None, state)
    assert "\n" not in str(e.value)


def test_portable_position_into_a_file_split_is_one_line(tok, docs, tmp_path):
    for k in range(6):
        write_docs(tmp_path / f"c4-train.{k:05d}-of-00006.json.gz", PER_FILE, start=k * PER_FILE)
    its = processes(spec_for(tmp_path), tok, 1)
    next(its[0])
    state = checkpoint(its)
    assert state["portable"]
    with pytest.raises(ConfigError, match="num_processes=2 would split 6 train files by file"):
        processes(spec_for(tmp_path), tok, 2)[0].restore(None, state)
