"""benchmarks/bench_inference.py: the deployment figures' arithmetic, and a real run on a tiny model.

The vLLM half runs in tests/test_vllm.py, where vLLM is installed.
"""
import json
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
    args = bench.parse_args(["--methods", "full,lowrank,folded", "--batches", "1,2", "--prompt", "8", "--new", "3",
                             "--repeats", "1", "--threads", "1"])
    mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
    result = bench.run(args, sizes=[TINY])
    assert (os.sched_getaffinity(0), torch.get_num_threads()) == (mask, threads)  # the pin is undone
    assert len(result["cores"]) == 1 and result["dtype"] == "fp32" and result["device"]
    rows = {(r["method"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(m, b) for m in bench.METHODS for b in (1, 2)} and {r["quant"] for r in rows.values()} == {"none"}
    for r in rows.values():
        assert r["prefill_tok_s"]["n"] == 1 and r["prefill_tok_s"]["median"] > 0
    folded, lowrank, full = rows["folded", 1], rows["lowrank", 1], rows["full", 1]
    assert (folded["params"], folded["weight_bytes"]) == (lowrank["params"], lowrank["weight_bytes"])
    assert full["params"] > folded["params"] and full["weight_bytes"] > folded["weight_bytes"]
    table = bench.table(result)
    assert len(table.splitlines()) == 2 + 6 and "vLLM" not in table
    ratios = bench.ratio_table(result).splitlines()
    assert len(ratios) == 2 + 2 and ratios[2].startswith("| bench_tiny | none | 1 | 1.")  # folded weighs less than full
    assert bench.ratio_table(result, "folded", "lowrank").splitlines()[2].startswith("| bench_tiny | none | 1 | 1.00 |")


def test_quantized_rows_time_what_dlr_quantize_writes_through_hf():
    """--quant w8a8 --hf-quant: each model is saved, quantized by dlr-quantize's own function and loaded
    the way dlr-eval loads it. transformers loads compressed-tensors int8 dequantized (it simulates the
    quantization), so its row holds the dequantized weights plus their scales: HF has no int8 path to
    time, which is what the row shows."""
    args = bench.parse_args(["--quant", "none,w8a8", "--hf-quant", "--batches", "2", "--prompt", "8", "--new", "3",
                             "--repeats", "1"])
    result = bench.run(args, sizes=[TINY])
    rows = {(r["method"], r["quant"]): r for r in result["rows"]}
    assert set(rows) == {(m, q) for m in ("full", "folded") for q in ("none", "w8a8")}
    for method in ("full", "folded"):
        plain, int8 = rows[method, "none"], rows[method, "w8a8"]
        assert int8["decode_tok_s"]["median"] > 0 and int8["params"] == plain["params"]
        assert int8["weight_bytes"] > plain["weight_bytes"]  # dequantized weights, and their scales
    assert rows["folded", "w8a8"]["weight_bytes"] < rows["full", "w8a8"]["weight_bytes"]
    assert "| bench_tiny | w8a8 | 2 |" in bench.ratio_table(result)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "full,dense"], "--methods: unknown dense; accepted: full, lowrank, folded"),
    (["--batches", "1,x"], "--batches: '1,x' is not a comma-separated list of integers"),
    (["--new", "1"], "--new: 1 is below 2"),
    (["--vllm-python", "/nonexistent/python"], "--vllm-python: '/nonexistent/python' is not a file"),
    (["--quant", "int3"], "--quant: unknown int3; accepted: none, w8a8, w4a16"),
    (["--quant", "w8a8"], "--quant w8a8: quantized rows are timed through vLLM or HF; add --vllm-python or --hf-quant"),
])
def test_bad_flags_are_one_line_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_saved_results_join_into_one_set_of_tables(tmp_path):
    """--tables: the docs' tables come from committed result files, several runs joined; runs of
    another setting are refused rather than mixed."""
    args = bench.parse_args(["--batches", "1", "--prompt", "8", "--new", "3", "--repeats", "1"])
    small = bench.run(args, sizes=[TINY])
    other = bench.run(args, sizes=[LlamaSize("bench_tiny2", hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                             num_hidden_layers=1, max_position_embeddings=64, default_rank=8)])
    (tmp_path / "a.json").write_text(json.dumps(small))
    (tmp_path / "b.json").write_text(json.dumps(other))
    joined = bench.merged([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert {r["size"] for r in joined["rows"]} == {"bench_tiny", "bench_tiny2"}
    assert len(bench.ratio_table(joined).splitlines()) == 2 + 2
    (tmp_path / "c.json").write_text(json.dumps({**other, "dtype": "bf16"}))
    with pytest.raises(SystemExit, match="differ in dtype"):
        bench.merged([str(tmp_path / "a.json"), str(tmp_path / "c.json")])
