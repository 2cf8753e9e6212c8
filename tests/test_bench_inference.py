"""benchmarks/bench_inference.py: the deployment figures' arithmetic, and a real run on a tiny model.

The vLLM half runs in tests/test_vllm.py, where vLLM is installed.
"""
import os

import pytest
import torch

from benchmarks import bench_inference as bench
from dlr.model.sizes import LlamaSize

TINY = LlamaSize("bench_tiny", hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                 max_position_embeddings=64, default_rank=8)


def test_rates_drop_the_warm_up_and_split_prefill_from_decode():
    # (first, full): 2 s for one token, 5 s for 4: the 3 further tokens of each of 2 rows took 3 s.
    pairs = [[100.0, 100.0], [2.0, 5.0], [4.0, 10.0], [3.0, 2.5]]
    got = bench.rates(pairs, batch=2, prompt=10, new=4)
    assert got["prefill_tok_s"] == {"median": 20 / 3, "min": 5.0, "max": 10.0, "n": 3}
    # The last repeat is inverted (full < first): it says nothing about decoding and is left out.
    assert got["decode_tok_s"] == {"median": (2.0 + 1.0) / 2, "min": 1.0, "max": 2.0, "n": 2}


def test_hf_and_vllm_see_the_same_fixed_prompts():
    assert bench.prompt_ids(3, 5) == bench.prompt_ids(3, 5)
    ids = bench.prompt_ids(8, 64)
    assert len(ids) == 8 and {len(r) for r in ids} == {64} and len({tuple(r) for r in ids}) == 8
    assert min(map(min, ids)) >= 5 and max(map(max, ids)) < 32000  # no special ids, inside T5's vocab


def test_a_tiny_run_measures_every_row_and_folded_weighs_what_lowrank_weighs():
    args = bench.parse_args(["--batches", "1,2", "--prompt", "8", "--new", "3", "--repeats", "1", "--threads", "1"])
    mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
    result = bench.run(args, sizes=[TINY])
    assert (os.sched_getaffinity(0), torch.get_num_threads()) == (mask, threads)  # the pin is undone
    assert len(result["cores"]) == 1 and result["dtype"] == "fp32" and result["device"]
    rows = {(r["method"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(m, b) for m in bench.METHODS for b in (1, 2)}
    for r in rows.values():
        assert r["prefill_tok_s"]["n"] == 1 and r["prefill_tok_s"]["median"] > 0
    folded, lowrank, full = rows["folded", 1], rows["lowrank", 1], rows["full", 1]
    assert (folded["params"], folded["weight_bytes"]) == (lowrank["params"], lowrank["weight_bytes"])
    assert full["params"] > folded["params"] and full["weight_bytes"] > folded["weight_bytes"]
    table = bench.table(result)
    assert len(table.splitlines()) == 2 + 6 and "vLLM" not in table
    ratios = bench.ratio_table(result).splitlines()
    assert len(ratios) == 2 + 2 and ratios[2].startswith("| bench_tiny | 1 | 0.")  # folded weighs less than full
    assert bench.ratio_table(result, "folded", "lowrank").splitlines()[2].startswith("| bench_tiny | 1 | 1.00 |")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "full,dense"], "--methods: unknown dense; accepted: full, lowrank, folded"),
    (["--batches", "1,x"], "--batches: '1,x' is not a comma-separated list of integers"),
    (["--new", "1"], "--new: 1 is below 2"),
    (["--vllm-python", "/nonexistent/python"], "--vllm-python: '/nonexistent/python' is not a file"),
])
def test_bad_flags_are_one_line_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
