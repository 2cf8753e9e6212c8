"""dlr-prepare token shards and data=tokens: contents, limits, num_proc, resume, order, validation, errors."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

from test_data_helpers import doc_ids, roundtrip, write_docs  # noqa: E402  (sets HF offline env first)

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dlr.data import data_spec, load_tokenizer, train_batches, validation_rows
from dlr.data.prepare import prepare
from dlr.data.shards import IDX_DTYPE, SplitShards, dtype_for, read_manifest
from dlr.data.token_batches import TokenBatches
from dlr.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
N_DOCS = 60


def sample_spec(**kw):
    return dataclasses.replace(data_spec(OmegaConf.load(CONFIGS / "c4_sample.yaml")), **kw)


def tokens_spec(path, **kw):
    return data_spec({"source": "tokens", "path": str(path), "val_tokens": None, **kw})


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    """The bundled C4 sample, prepared (whole train and validation splits)."""
    out = tmp_path_factory.mktemp("tok") / "c4_sample"
    prepare(sample_spec(), out, progress=False)
    return out


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Five small C4-style files, 60 documents "doc<i>x ..." in all (as in test_data_resume)."""
    d = tmp_path_factory.mktemp("c4")
    start = 0
    for k, n in enumerate((15, 10, 14, 11, 10)):
        write_docs(d / f"c4-train.{k:05d}-of-00005.json.gz", n, start=start)
        start += n
    write_docs(d / "c4-validation.00000-of-00001.json.gz", 20, start=1000)
    return d


def docs_spec(d, **kw):
    return data_spec({"source": "json", "train_files": str(d / "c4-train.*.json.gz"),
                      "validation_files": str(d / "c4-validation.*.json.gz"), "seq_len": 16, "val_tokens": None, **kw})


@pytest.fixture(scope="module")
def small_dir(docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "small"
    prepare(docs_spec(docs), out, progress=False)
    return out


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*-*.bin")) + sorted(root.glob("*-*.idx"))}


# --- the shards themselves -------------------------------------------------------------------

def test_shards_hold_every_document_in_order_with_its_boundaries(tok, docs, small_dir):
    m = read_manifest(small_dir)
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 32000 and m["tokenizer"]["name"] == "t5"
    assert [s["documents"] for s in m["splits"]["train"]["shards"]] == [15, 10, 14, 11, 10]
    assert m["splits"]["train"]["complete"] and m["splits"]["validation"]["documents"] == 20
    assert {"created", "dlr_version", "source", "files"} <= set(m)
    shards = SplitShards(small_dir, "train")
    texts = [f"doc{i}x " + " ".join(["the cat sat"] * (1 + (i * 7) % 11)) for i in range(N_DOCS)]
    assert list(shards.iter_documents()) == tok.encode_batch(texts)
    assert shards.num_tokens == m["splits"]["train"]["tokens"] == sum(len(x) for x in tok.encode_batch(texts))


def test_limits_cut_at_whole_documents_and_num_proc_gives_the_same_bytes(tok, docs, tmp_path):
    texts = [f"doc{i}x " + " ".join(["the cat sat"] * (1 + (i * 7) % 11)) for i in range(N_DOCS)]
    lengths = np.array([len(x) for x in tok.encode_batch(texts)])
    want = int(lengths[:31].sum()) - 1  # reached inside document 30 (the third file)
    one = prepare(docs_spec(docs), tmp_path / "one", tokens=want, progress=False)
    two = prepare(docs_spec(docs), tmp_path / "two", tokens=want, num_proc=2, progress=False)
    train = one["splits"]["train"]
    assert train["documents"] == 31 and train["tokens"] == int(lengths[:31].sum()) and not train["complete"]
    assert [s["documents"] for s in train["shards"]] == [15, 10, 6]
    assert not (tmp_path / "two" / "train-00003.bin").exists()  # speculative work past the limit is removed
    assert two["splits"] == {k: v for k, v in one["splits"].items()}
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    docs_only = prepare(docs_spec(docs), tmp_path / "docs", documents=12, progress=False)
    assert docs_only["splits"]["train"]["documents"] == 12


def test_interrupted_prepare_resumes_and_a_finished_one_is_not_redone(docs, small_dir, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(small_dir, out)
    # What a kill leaves: no manifest, one shard without its record, one half-written temp file.
    (out / "manifest.json").unlink()
    (out / "train-00002.json").unlink()
    (out / "train-00003.bin").write_bytes((out / "train-00003.bin").read_bytes()[:10])
    (out / "train-00004.bin.tmp").write_bytes(b"partial")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-0000[01].*")}
    prepare(docs_spec(docs), out, progress=False)
    assert shard_bytes(out) == shard_bytes(small_dir)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-0000[01].*")} == before  # kept, not redone
    assert not list(out.glob("*.tmp"))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    prepare(docs_spec(docs), out, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"other settings \(differs in: limits.documents\)"):
        prepare(docs_spec(docs), out, documents=5, progress=False)


def test_uint32_shards_round_trip(tmp_path):
    """Vocabularies over 65,536 ids are stored as uint32 (written as prepare writes them)."""
    from dlr.data.prepare import _write_shard

    assert dtype_for(65_536) == np.uint16 and dtype_for(65_537) == np.uint32
    ids = np.array([5, 70_000, 131_071, 9, 65_536], dtype="<u4")
    offsets = np.array([0, 2, 5], dtype=IDX_DTYPE)
    rec = _write_shard(tmp_path, "train-00000", "x", ids, offsets)
    manifest = {"dtype": "uint32", "tokenizer": {"vocab_size": 131_072},
                "splits": {"train": {"documents": 2, "tokens": 5, "shards": [rec]}}}
    s = SplitShards(tmp_path, "train", manifest)
    assert list(s.iter_documents()) == [[5, 70_000], [131_071, 9, 65_536]]
    assert s.gather(np.array([1, 4])).tolist() == [70_000, 65_536]
    # One vocabulary smaller, 131,071 is no id of it.
    smaller = SplitShards(tmp_path, "train", {**manifest, "tokenizer": {"vocab_size": 131_071}})
    assert smaller.gather(np.array([0, 1])).tolist() == [5, 70_000]
    with pytest.raises(ConfigError, match="hold token id 131071, outside the tokenizer's 131071 ids"):
        smaller.gather(np.array([2]))


# --- validation: the same rows as the streaming path -------------------------------------------

@pytest.mark.parametrize("mode,val_tokens", [("paper", None), ("packed", None), ("paper", 20_000), ("packed", 20_000)])
def test_validation_rows_equal_the_streaming_path_on_the_bundled_sample(tok, sample_dir, mode, val_tokens):
    a = validation_rows(sample_spec(mode=mode, val_tokens=val_tokens), tok)
    b = validation_rows(tokens_spec(sample_dir, mode=mode, val_tokens=val_tokens), tok)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_validation_perplexity_agrees_exactly(tok, sample_dir):
    import dlr
    from dlr.data import validation_batches
    from dlr.eval.loss import evaluate

    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method="dlr", vocab_size=tok.vocab_size)
    a = evaluate(model, validation_batches(sample_spec(val_tokens=5000), tok, 16), "cpu")
    b = evaluate(model, validation_batches(tokens_spec(sample_dir, val_tokens=5000), tok, 16), "cpu")
    assert a == b and 4900 < a["val_tokens"] < 5000  # 5000 label tokens less the first of each row


def test_validation_beyond_what_was_prepared_is_refused(docs, tok, tmp_path):
    prepare(docs_spec(docs, val_tokens=40), tmp_path / "v", progress=False)
    spec = tokens_spec(tmp_path / "v", seq_len=16)
    assert int((validation_rows(dataclasses.replace(spec, val_tokens=40), tok)[1] != -100).sum()) == 40
    with pytest.raises(ConfigError, match="holds only the first .* validation tokens"):
        validation_rows(dataclasses.replace(spec, val_tokens=100_000), tok)


# --- training order, sharding over processes, resume -------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_document_exactly_once_per_epoch(tok, small_dir, world_size):
    B = 2
    steps = N_DOCS // (world_size * B)
    seen = Counter()
    for rank in range(world_size):
        it = train_batches(tokens_spec(small_dir, seq_len=16, shuffle_buffer=8), tok, B, rank, world_size, seed=5)
        for _ in range(steps):
            seen.update(doc_ids(next(it), tok))
        it.close()
    assert sorted(seen) == list(range(N_DOCS)) and set(seen.values()) == {1}


@pytest.mark.parametrize("mode", ["paper", "packed"])
def test_a_global_step_does_not_depend_on_the_number_of_processes(tok, small_dir, mode):
    """Rank r's row j is row j*W + r of one process with W times the batch, across epochs too."""
    spec = tokens_spec(small_dir, seq_len=16, shuffle_buffer=8, mode=mode)
    G, steps = 6, 25  # global batch 6; 150 rows: paper crosses two epoch boundaries
    single = train_batches(spec, tok, G, 0, 1, seed=9)
    want = torch.cat([next(single)["input_ids"] for _ in range(steps)])
    single.close()
    for W in (2, 3):
        for r in range(W):
            it = train_batches(spec, tok, G // W, r, W, seed=9)
            got = torch.cat([next(it)["input_ids"] for _ in range(steps)])
            it.close()
            assert torch.equal(got, want[r::W]), (W, r)


def test_seed_fixes_the_order(tok, small_dir):
    spec = tokens_spec(small_dir, seq_len=16, shuffle_buffer=8)
    a, b, c = (train_batches(spec, tok, 4, 0, 1, seed=s) for s in (1, 1, 2))
    xa, xb, xc = (torch.cat([next(it)["input_ids"] for _ in range(5)]) for it in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    unshuffled = train_batches(tokens_spec(small_dir, seq_len=16, shuffle_buffer=0), tok, 4, 0, 1, seed=1)
    assert doc_ids(next(unshuffled), tok) == [0, 1, 2, 3]  # shuffle_buffer=0: prepare order
    for it in (a, b, c, unshuffled):
        it.close()


@pytest.mark.parametrize("mode,prefetch,world_size", [("paper", 4, 1), ("packed", 4, 2), ("paper", 0, 2)])
def test_resume_equals_uninterrupted(tok, small_dir, mode, prefetch, world_size):
    spec = tokens_spec(small_dir, seq_len=16, shuffle_buffer=8, mode=mode, prefetch=prefetch)
    B, before, after = 3, 7, 12  # crosses an epoch boundary
    rank = world_size - 1
    ref_it = train_batches(spec, tok, B, rank, world_size, seed=11)
    ref = [next(ref_it) for _ in range(before + after)]
    ref_it.close()
    it = train_batches(spec, tok, B, rank, world_size, seed=11)
    for i in range(before):
        next(it)
    state = roundtrip(it.state_dict())
    next(it)  # the prefetch thread is ahead of the consumer; the state is not
    it.close()
    resumed = train_batches(spec, tok, B, rank, world_size, seed=11)
    resumed.load_state_dict(state)
    for i in range(before, before + after):
        b = next(resumed)
        assert torch.equal(b["input_ids"], ref[i]["input_ids"]) and torch.equal(b["labels"], ref[i]["labels"]), i
    resumed.close()


def test_a_token_data_state_that_names_the_processes_rank_and_world_size_resumes_exactly(tok, small_dir):
    """Data states written by earlier dlr name the process keys `rank` / `world_size`."""
    spec = tokens_spec(small_dir, seq_len=16, shuffle_buffer=8, prefetch=0)
    ref_it = train_batches(spec, tok, 3, 1, 2, seed=11)
    ref = [next(ref_it)["input_ids"] for _ in range(9)]
    it = train_batches(spec, tok, 3, 1, 2, seed=11)
    for _ in range(5):
        next(it)
    state = roundtrip(it.state_dict())
    names = {"process_index": "rank", "num_processes": "world_size"}
    old = {**state, "config": {names.get(k, k): v for k, v in state["config"].items()}}
    assert {"rank", "world_size"} <= set(old["config"])
    resumed = train_batches(spec, tok, 3, 1, 2, seed=11)
    resumed.load_state_dict(old)
    assert all(torch.equal(next(resumed)["input_ids"], ref[i]) for i in range(5, 9))
    with pytest.raises(ConfigError, match="process_index=1 now but 0 in the checkpoint"):
        resumed.load_state_dict({**old, "config": {**old["config"], "rank": 0}})


def _run_state(its) -> dict:
    """What dlr-train writes to data.json for these processes (through JSON, as on disk)."""
    return json.loads(json.dumps(its[0].global_state([it.local_position() for it in its])))


@pytest.mark.parametrize("mode", ["paper", "packed"])
def test_resume_on_another_number_of_processes_continues_the_same_global_steps(tok, small_dir, mode):
    """2 processes for k steps, then 1 or 4 (other micro-batch, grad accumulation) from the global
    position: the next global steps' rows are the uninterrupted 2-process run's."""
    spec = tokens_spec(small_dir, seq_len=16, shuffle_buffer=8, mode=mode)
    G, k, more = 8, 5, 6  # global batch 8; 88 rows: paper crosses an epoch boundary

    def steps(its, n, accum=1):
        """n global steps: each process's `accum` micro-batches, interleaved into global item order."""
        out = []
        for _ in range(n):
            micro = [[next(it)["input_ids"] for it in its] for _ in range(accum)]
            W, B = len(its), micro[0][0].shape[0]
            rows = torch.empty(accum * W * B, micro[0][0].shape[1], dtype=torch.long)
            for a, per_rank in enumerate(micro):
                for r, x in enumerate(per_rank):
                    rows[a * W * B + r: (a + 1) * W * B: W] = x  # item (n*B + j)*W + r
            out.append(rows)
        return out

    def processes(W, B):
        return [train_batches(spec, tok, B, r, W, seed=4) for r in range(W)]

    ref = processes(2, 4)
    want = steps(ref, k + more)
    its = processes(2, 4)
    steps(its, k)
    state = _run_state(its)
    assert state["portable"] and state["items"] == k * G
    for W, B, accum in ((1, 4, 2), (4, 1, 2), (4, 2, 1)):
        resumed = processes(W, B)
        for it in resumed:
            it.restore(None, state)
        got = steps(resumed, more, accum)
        assert all(torch.equal(a, b) for a, b in zip(got, want[k:])), (W, B)
        for it in resumed:
            it.close()
    # The same processes and batch size take their own exact state.
    own = [json.loads(json.dumps(it.state_dict())) for it in its]
    resumed = processes(2, 4)
    for it, mine in zip(resumed, own):
        it.restore(mine, state)
    assert all(torch.equal(a, b) for a, b in zip(steps(resumed, more), want[k:]))
    for it in [*ref, *its, *resumed]:
        it.close()


def test_a_position_that_another_geometry_cannot_continue_is_one_line(tok, small_dir, docs):
    spec = tokens_spec(small_dir, seq_len=16, shuffle_buffer=8)
    its = [train_batches(spec, tok, 3, r, 2, seed=4) for r in range(2)]
    for it in its:
        next(it)
    state = _run_state(its)  # 6 documents consumed
    cases = [(train_batches(spec, tok, 2, 0, 2, seed=4), r"items=6 global documents, not a multiple of "
                                                         r"micro_batch\*processes=2\*2=4"),
             (train_batches(spec, tok, 3, 0, 1, seed=5), "seed=5 now but 4 in the checkpoint"),
             (train_batches(tokens_spec(small_dir, seq_len=32, shuffle_buffer=8), tok, 3, 0, 1, seed=4),
              "seq_len=32 now but 16 in the checkpoint"),
             (train_batches(docs_spec(docs), tok, 3, 0, 1, seed=4), "comes from token shards")]
    for it, needle in cases:
        with pytest.raises(ConfigError, match=needle) as e:
            it.restore(None, state)
        assert "\n" not in str(e.value)
    stream = train_batches(docs_spec(docs), tok, 3, 0, 1, seed=4)
    next(stream)
    with pytest.raises(ConfigError, match="comes from a streaming data config"):
        its[0].restore(None, json.loads(json.dumps(stream.global_state([stream.local_position()]))))
    for it in [*its, stream, *(c[0] for c in cases)]:
        it.close()


def test_paper_rows_match_the_streaming_batch_builder(tok, sample_dir):
    """Same documents in, same rows out: truncation to T-1, EOS, padding, labels."""
    from dlr.data import paper_batch

    it = TokenBatches(tokens_spec(sample_dir, shuffle_buffer=0, prefetch=0), tok, 8, 0, 1, seed=0)
    docs = list(SplitShards(sample_dir, "train").iter_documents())[:8]
    want = paper_batch(docs, 256, tok.pad_id, tok.eos_id)
    got = next(it)
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])


def test_packed_windows_are_the_eos_joined_stream(tok, small_dir):
    it = train_batches(tokens_spec(small_dir, seq_len=16, shuffle_buffer=0, mode="packed"), tok, 4, 0, 1, seed=0)
    stream = [t for d in SplitShards(small_dir, "train").iter_documents() for t in d + [tok.eos_id]]
    got = torch.cat([next(it)["input_ids"].flatten() for _ in range(3)]).tolist()
    assert got == stream[: len(got)]
    it.close()


# --- bad input: one line ------------------------------------------------------------------------

def test_truncated_shard_is_one_line(tok, small_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_dir, bad)
    p = bad / "train-00001.bin"
    p.write_bytes(p.read_bytes()[:-6])
    with pytest.raises(ConfigError, match=r"train-00001.bin' is truncated or damaged: .*re-run the same dlr-prepare"):
        train_batches(tokens_spec(bad), tok, 2, 0, 1, seed=0)


def test_missing_split_and_missing_dir_are_one_line(tok, docs, tmp_path):
    spec = data_spec({"source": "json", "validation_files": str(docs / "c4-validation.*.json.gz"), "val_tokens": None})
    prepare(spec, tmp_path / "val_only", progress=False)
    with pytest.raises(ConfigError, match="has no train split \\(it holds: validation\\)"):
        train_batches(tokens_spec(tmp_path / "val_only"), tok, 2, 0, 1, seed=0)
    with pytest.raises(ConfigError, match="does not exist; write it with: dlr-prepare"):
        tokens_spec(tmp_path / "nowhere")


def test_tokenizer_mismatch_is_one_line(small_dir, hf_tokenizer_dir):
    other = load_tokenizer(str(hf_tokenizer_dir))
    with pytest.raises(ConfigError, match="tokenizer mismatch: .* prepared with tokenizer 't5'"):
        train_batches(tokens_spec(small_dir, tokenizer=str(hf_tokenizer_dir)), other, 2, 0, 1, seed=0)
    with pytest.raises(ConfigError, match="tokenizer mismatch"):
        validation_rows(tokens_spec(small_dir), other)


def test_hf_tokenizer_prepares_and_reloads_with_the_same_hash(docs, hf_tokenizer_dir, tmp_path):
    m = prepare(docs_spec(docs, tokenizer=str(hf_tokenizer_dir)), tmp_path / "hf", progress=False)
    assert m["dtype"] == "uint16" and m["tokenizer"]["class"] == "HFTokenizer"
    spec = tokens_spec(tmp_path / "hf", seq_len=16)  # tokenizer null: the copy saved with the shards
    tok = load_tokenizer(spec.tokenizer)
    assert next(train_batches(spec, tok, 2, 0, 1, seed=0))["input_ids"].shape == (2, 16)


def test_streaming_state_is_refused_by_token_batches(tok, small_dir, docs):
    stream = train_batches(docs_spec(docs), tok, 2, 0, 1, seed=0)
    next(stream)
    shards = train_batches(tokens_spec(small_dir, seq_len=16), tok, 2, 0, 1, seed=0)
    with pytest.raises(ConfigError, match="comes from a streaming data config"):
        shards.load_state_dict(stream.state_dict())
    with pytest.raises(ConfigError, match="comes from token shards"):
        stream.load_state_dict(shards.state_dict())


def test_prepare_streams_from_the_hub_like_from_local_files(hub_mirror, tmp_path):
    """data=c4 (hf:// globs and streaming, against test_data_hub's offline mirror) gives the same
    shards as data=c4_local on the same files; the limits stop reading early."""
    hub = data_spec({**OmegaConf.to_container(OmegaConf.load(CONFIGS / "c4.yaml")), "val_tokens": 5000})
    local = data_spec({**OmegaConf.to_container(OmegaConf.load(CONFIGS / "c4_local.yaml")), "val_tokens": 5000,
                       "train_files": f"{hub_mirror}/c4-train.*-of-01024.json.gz",
                       "validation_files": f"{hub_mirror}/c4-validation.*-of-00008.json.gz"})
    a = prepare(hub, tmp_path / "tok_hub", tokens=30_000, progress=False)
    b = prepare(local, tmp_path / "tok_local", tokens=30_000, progress=False)
    assert a["files"]["train"][0].startswith("hf://datasets/allenai/c4/en/c4-train.00000-of-01024")
    counts = [{k: (v["documents"], v["tokens"], [(sh["documents"], sh["tokens"]) for sh in v["shards"]])
               for k, v in m["splits"].items()} for m in (a, b)]
    assert counts[0] == counts[1]
    assert shard_bytes(tmp_path / "tok_hub") == shard_bytes(tmp_path / "tok_local")
    assert a["splits"]["train"]["tokens"] >= 30_000 and not a["splits"]["train"]["complete"]


from test_data_hub import hub_mirror  # noqa: E402,F401  (the fixture)
from test_hf_tokenizer import hf_tokenizer_dir  # noqa: E402,F401  (the fixture)


def test_limit_cuts_at_the_first_document_that_reaches_it():
    from dlr.data.prepare import Limit

    zero = np.zeros(4, dtype=np.int64)
    lens = np.array([5, 5, 5])
    assert Limit(tokens=10).keep(lens, zero) == 2 and Limit(tokens=11).keep(lens, zero) == 3
    assert Limit(tokens=16).keep(lens, zero) is None
    assert Limit(tokens=10).keep(lens, Limit(tokens=10).counts(lens[:2])) == 0  # already met: nothing more
    assert Limit(documents=2).keep(lens, zero) == 2 and Limit().keep(lens, zero) is None
    # Validation: label tokens in both modes at seq_len 4: packed 6 per document, paper 4.
    assert Limit(val_tokens=12, seq_len=4).keep(lens, zero) == 3 and Limit(val_tokens=12, seq_len=8).keep(lens, zero) == 2


# --- end to end: dlr-prepare, dlr-train, dlr-eval --------------------------------------------

def _cli(module, *args, check=True, launcher=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*(launcher or (sys.executable, "-m")), module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


TRAIN = ["model=llama_tiny", "data=tokens", "global_batch=8", "micro_batch=4", "log_every=1", "data.val_tokens=2000",
         "eval_every=2", "save_every=1", "method=dlr", "steps=4"]


def test_train_from_shards_resumes_bitwise_after_sigkill_and_evaluates_like_streaming(sample_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train import records

    common = [*TRAIN, f"data.path={sample_dir}", "data.mode=packed"]
    _cli("dlr.cli.train", *common, f"out_dir={tmp_path / 'straight'}")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dlr.cli.train", *common, f"out_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_2").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    _cli("dlr.cli.train", *common, f"out_dir={killed}", "resume=auto")
    assert records(killed) == records(tmp_path / "straight") and len(records(killed)) == 4
    assert records(killed, "val_ppl") == records(tmp_path / "straight", "val_ppl")
    # dlr-eval of the same model on the shards and on the streamed sample: the same number.
    ppl = {}
    for data in (["data=tokens", f"data.path={sample_dir}"], ["data=c4_sample"]):
        out = tmp_path / f"{data[0].replace('=', '_')}.json"
        _cli("dlr.cli.evaluate", f"ckpt={killed / 'final'}", *data, "eval_tokens=3000", "progress=false", f"out={out}")
        ppl[data[0]] = json.loads(out.read_text())
    assert ppl["data=tokens"]["val_ppl"] == ppl["data=c4_sample"]["val_ppl"]
    assert ppl["data=tokens"]["tokens"] == ppl["data=c4_sample"]["tokens"] > 2900


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(sample_dir, tmp_path):
    """2 gloo processes == 1 process with the same global batch; the 2-process run cut after
    step 1 resumes on 1 process (another micro-batch) and continues the same global steps."""
    import sys

    from test_train import records
    from test_train_fsdp2 import _cut_at, _max_rel

    common = [*TRAIN, f"data.path={sample_dir}", "steps=3", "eval_every=3", "save_every=1", "keep_last=3"]
    _cli("dlr.cli.train", *common, "micro_batch=4", f"out_dir={tmp_path / 'one'}")
    two = tmp_path / "two"
    _cli("dlr.cli.train", *common, "micro_batch=2", f"out_dir={two}",
         launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"))
    assert list(records(two)) == [1, 2, 3]
    assert _max_rel(records(two), records(tmp_path / "one")) < 1e-5
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    _cut_at(resumed, 1)
    _cli("dlr.cli.train", *common, "micro_batch=2", f"out_dir={resumed}")  # 1 process, 4 micro-batches a step
    assert json.loads((resumed / "checkpoints" / "step_3" / "trainer_state.json").read_text())["processes"] == 1
    got, want = records(resumed), records(two)
    print(f"max relative loss difference, resumed 2->1 vs uninterrupted 2: {_max_rel(got, want):.2e}")
    assert list(got) == [1, 2, 3] and got[1] == want[1]
    assert _max_rel(got, want) < 1e-5
    assert records(resumed, "val_loss")[3] == pytest.approx(records(two, "val_loss")[3], rel=1e-5)


@pytest.mark.parametrize("args,needle", [
    (["data=c4_sample"], "out is required"),
    (["data=c4_sample", "out=X", "tokens=5", "documents=5"], "tokens=5 and documents=5 both set"),
    (["data=c4_sample", "out=X", "num_proc=0"], "num_proc=0 is not valid"),
    (["data=tokens", "data.path=SAMPLE", "out=X"], "data=tokens is already prepared"),
    (["data=c4_local", "data.train_files=/nonexistent/*.json.gz", "data.validation_files=/nonexistent/v.json", "out=X"],
     "matches no files"),
])
def test_prepare_bad_input_is_one_line_and_writes_nothing(sample_dir, tmp_path, capsys, args, needle):
    from dlr.cli.prepare import main

    out = tmp_path / "out"
    args = [a.replace("out=X", f"out={out}").replace("SAMPLE", str(sample_dir)) for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("dlr-prepare: error:") and needle in err[0], err
    assert not out.exists()


def test_prepare_cli_then_train_refuses_a_truncated_shard_in_one_line(docs, tmp_path, capsys, caplog):
    import logging

    from dlr.cli.prepare import main

    caplog.set_level(logging.INFO, logger="dlr.data.prepare")
    out = tmp_path / "tok"
    args = ["data=c4_local", f"data.train_files={docs}/c4-train.*.json.gz",
            f"data.validation_files={docs}/c4-validation.*.json.gz", f"out={out}", "progress=false"]
    for _ in range(2):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 0 and "train: 60 documents" in capsys.readouterr().out
    assert "already prepared" in caplog.text
    p = out / "train-00002.bin"
    p.write_bytes(p.read_bytes()[:-4])
    run = tmp_path / "run"
    proc = _cli("dlr.cli.train", *TRAIN, f"data.path={out}", f"out_dir={run}", check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "train-00002.bin' is truncated" in err[0], proc.stderr[-2000:]
    assert not run.exists()


@pytest.mark.parametrize("damage,needle", [
    ("id", "hold token id 65535, outside the tokenizer's 32000 ids"),
    ("offsets", "train-00000.idx' is damaged (offsets do not run from 0 to"),
    ("validation", "validation token shards"),
])
def test_damaged_shards_are_refused_before_the_run_directory_is_made(sample_dir, tmp_path, capsys, monkeypatch,
                                                                      damage, needle):
    import sys

    from dlr.cli import train as train_cli

    tokens = tmp_path / "tok"
    shutil.copytree(sample_dir, tokens)
    if damage in ("id", "validation"):  # every id of the split's shards: the first batch reads some
        for p in tokens.glob(f"{'train' if damage == 'id' else 'validation'}-*.bin"):
            np.full(p.stat().st_size // 2, 65535, dtype=np.uint16).tofile(p)
    else:  # two offsets swapped: the sizes and both ends are still right
        idx = np.fromfile(tokens / "train-00000.idx", dtype=IDX_DTYPE)
        idx[[3, 4]] = idx[[4, 3]]
        idx.tofile(tokens / "train-00000.idx")
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["dlr-train", *TRAIN, f"data.path={tokens}", f"out_dir={run}"])
    with pytest.raises(SystemExit) as e:
        train_cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err[-20:]
    assert not run.exists()
