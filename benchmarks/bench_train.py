"""Training step time and peak memory of full / lowrank / dlr, and an explicit-expansion DLR reference.

    python -m benchmarks.bench_train --device cpu --sizes llama_tiny,llama_60m --micro-batch 4 --repeats 7
    python -m benchmarks.bench_train --device cuda --dtype bf16 --sizes llama_60m,llama_130m --micro-batch 32 --json out.json

One training step = forward + backward + AdamW step on `micro-batch x seq` random tokens,
the trainer's precision handling (fp32 weights, bf16 autocast when --dtype bf16). Methods:

  full, lowrank, dlr      the zoo models as dlr-train builds them (dlr: residual through B + sR)
  dlr_scatter             the residual as a scatter: F.linear(z, B.scatter_add(1, index, torch.full(...)))
                          in every precision (no cached operands, no fp32 rebuild, no compile path)
  dlr_ri                  reference DLR that expands the latent per token:
                          y = B z + s * z.repeat_interleave(K)[..., :d_out]

Time: all methods of a size stay resident and are stepped round-robin (one step of each per
round), so load drift on a shared machine hits every method alike; the median over rounds
after --warmup rounds is reported. Peak memory: on CUDA, torch.cuda.max_memory_allocated
minus what was allocated before the model was built (weights + grads + AdamW state +
activations); on CPU, the peak-RSS increase (VmHWM) of a fresh child process over its RSS after
imports, with glibc's mmap threshold fixed at 64 KiB so that RSS follows live tensors
(torch's CPU allocator is invisible to tracemalloc).
"""
from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dlr.config
from dlr import build_model, model_stats
from dlr.config import DTYPE_NAMES
from dlr.hf.lowrank import LowRankLinear, expansion_factor
from dlr.model.fused_loss import LOSS_IMPLS, make_loss_fn, resolve_loss_impl
from dlr.train.compile import compile_decoder, compile_layers
from dlr.train.layer_paths import apply_training_paths
from dlr.train.objective import TrainingObjective
from dlr.train.telemetry import peak_flops

from .recipe import SEQ, recipe_micro_batch

METHODS = (*dlr.config.METHODS, "dlr_scatter", "dlr_ri")
REPO = Path(__file__).resolve().parent.parent


class RepeatInterleaveDLR(LowRankLinear):
    """The naive DLR residual: materializes the [tokens, d_out] expansion of z every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.latent(x)
        y = self.B(z)
        if self.dlr_index is None:
            return y
        k = expansion_factor(self.out_features, self.rank)
        return y + self.dlr_scale * z.repeat_interleave(k, dim=-1)[..., : self.out_features]


class ScatterAddDLR(LowRankLinear):
    """B + sR as a fill, a scatter and autocast's cast per call, whatever the precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.latent(x)
        if self.dlr_index is None:
            return self.B(z)
        B = self.B.weight
        src = torch.full((self.out_features, 1), self.dlr_scale, dtype=B.dtype, device=B.device)
        return F.linear(z, B.scatter_add(1, self.dlr_index.unsqueeze(1), src))


VARIANTS = {"dlr_ri": RepeatInterleaveDLR, "dlr_scatter": ScatterAddDLR}


def compile_model(model) -> None:
    """Whole-model compilation: one graph from the embedding to the loss, done by make_step on
    the training objective. The trainer keeps the loss out of its graph (compile_decoder); this
    scope is here to compare against."""


COMPILE_SCOPE = {"decoder": compile_decoder, "layers": compile_layers, "model": compile_model}
SCOPE = ["decoder"]  # --compile-scope; a list so the memory child and build() share it
FIRST_STEP_S: dict[tuple[str, str], float] = {}
MODE: list[str | None] = [None]  # --compile-mode (None: torch.compile's default, what dlr-train uses)
PROFILE: list[Path | None] = [None]  # --profile


def build(size: str, method: str, device: torch.device, compile: bool = False) -> torch.nn.Module:
    model = build_model(size, "dlr" if method in VARIANTS else method, device=device)
    apply_training_paths(model)  # what dlr-train runs
    if method in VARIANTS:
        for m in model.modules():
            if isinstance(m, LowRankLinear) and m.has_residual:
                k = expansion_factor(m.out_features, m.rank)
                # repeat_interleave is the uniform expansion; the zoo default is uniform.
                assert m.dlr_index.is_meta or torch.equal(m.dlr_index.cpu(), torch.arange(m.out_features) // k)
                m.__class__ = VARIANTS[method]
    if compile and device.type != "meta" and MODE[0] is not None:
        if SCOPE[0] not in ("decoder", "model"):
            sys.exit("--compile-mode needs --compile-scope decoder or model")
        if SCOPE[0] == "decoder":  # the model scope is compiled with its loss, in make_step
            model.model.compile(mode=MODE[0])
    elif compile and device.type != "meta":
        COMPILE_SCOPE[SCOPE[0]](model)  # what dlr-train does with compile=true (and compile=auto on CUDA)
    return model


def make_step(model: torch.nn.Module, device: torch.device, dtype: str, batch: int, vocab: int, loss: str = "chunked",
              compile: bool = False):
    # The trainer's loss: plain = HF's lm_head + fp32 logits; chunked/liger from the hidden states.
    objective = TrainingObjective(model, make_loss_fn(resolve_loss_impl(loss, device), compiled=compile))
    if compile and SCOPE[0] == "model" and device.type != "meta":
        objective.compile(mode=MODE[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, SEQ), generator=gen).to(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = objective(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss.detach())

    return step


def _proc_status_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc: both belong to this process's
    own address space. getrusage's ru_maxrss would not do: Linux carries it across exec, so a
    child forked from a large parent starts with the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(size: str, method: str, dtype: str, batch: int, compile: bool, loss: str) -> None:
    """Run in a fresh process: the peak-RSS increase of building and stepping one model."""
    torch.manual_seed(0)
    base = _proc_status_gib("VmRSS")
    model = build(size, method, torch.device("cpu"), compile)
    step = make_step(model, torch.device("cpu"), dtype, batch, model.config.vocab_size, loss, compile)
    for _ in range(2):
        step()
    print(json.dumps({"peak_mem_gib": _proc_status_gib("VmHWM") - base}))


def peak_memory(size: str, method: str, device: torch.device, dtype: str, batch: int, warmup: int,
                compile: bool, loss: str) -> tuple[float, object]:
    """(peak GiB, (model, step)) on CUDA; on CPU (peak GiB from a child process, None)."""
    if device.type == "cpu":
        # A fixed mmap threshold makes glibc map every tensor-sized block on its own and unmap
        # it on free, so peak RSS is the peak of live tensors. With its default dynamic
        # threshold, reuse of freed heap made the same measurement vary by 20% run to run.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--_memory-child", size, method,
                               "--dtype", dtype, "--micro-batch", str(batch), "--loss", loss]
                              + (["--compile"] if compile else []), capture_output=True, text=True, env=env,
                              cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"memory child {size} {method} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_gib"], None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = build(size, method, device, compile)
    step = make_step(model, device, dtype, batch, model.config.vocab_size, loss, compile)
    FIRST_STEP_S[(size, method)] = timed(step)
    for _ in range(max(warmup, 2) - 1):
        step()
    return (torch.cuda.max_memory_allocated(device) - base) / 1024**3, (model, step)


def timed(step) -> float:
    """Seconds of one step (it syncs a GPU itself): the first one holds the compile."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def bench_size(size: str, methods: list[str], device: torch.device, dtype: str, batch: int, warmup: int,
               repeats: int, compile: bool = False, loss: str = "chunked") -> list[dict]:
    stats = {m: model_stats(build(size, m, torch.device("meta")), SEQ) for m in methods}
    mem, live = {}, {}
    for m in methods:
        mem[m], live[m] = peak_memory(size, m, device, dtype, batch, warmup, compile, loss)
    if device.type == "cpu":
        for m in methods:
            torch.manual_seed(0)
            model = build(size, m, device, compile)
            live[m] = (model, make_step(model, device, dtype, batch, model.config.vocab_size, loss, compile))
            FIRST_STEP_S[(size, m)] = timed(live[m][1])
    # Same-weights check of the reference against the product's B + sR path.
    if "dlr" in live and "dlr_ri" in live and not compile:  # a compiled check would recompile for no-grad
        with torch.no_grad():
            ids = torch.randint(0, 1000, (1, 32), device=device)
            live["dlr_ri"][0].load_state_dict(live["dlr"][0].state_dict())
            a, b = (live[k][0](input_ids=ids).logits.float() for k in ("dlr", "dlr_ri"))
            ref_diff = float((a - b).abs().max())
    else:
        ref_diff = None
    times = {m: [] for m in methods}
    for r in range(warmup + repeats):
        for m in methods:
            t0 = time.perf_counter()
            live[m][1]()
            if r >= warmup:
                times[m].append(time.perf_counter() - t0)
    if PROFILE[0] is not None and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for m in methods:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    live[m][1]()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
            with PROFILE[0].open("a") as f:
                f.write(f"\n## {size} {m} (2 steps, compile={compile} scope={SCOPE[0]})\n{table}\n")
    peak = peak_flops(device) if device.type == "cuda" else None
    rows = []
    for m in methods:
        med = statistics.median(times[m])
        tok_s = batch * SEQ / med
        rows.append({
            "size": size, "method": m, "device": str(device), "dtype": dtype, "compiled": compile,
            "compile_scope": SCOPE[0] if compile else None,
            "loss": resolve_loss_impl(loss, device), "micro_batch": batch, "seq": SEQ,
            "params": stats[m].total_params, "train_flops_per_token": stats[m].train_flops_per_token,
            "first_step_s": FIRST_STEP_S.get((size, m)),  # compile (if any) + one step: paid once per run
            "ms_per_step": med * 1e3, "ms_min": min(times[m]) * 1e3, "ms_max": max(times[m]) * 1e3,
            "tokens_per_s": tok_s, "peak_mem_gib": mem[m],
            "mfu": tok_s * stats[m].train_flops_per_token / peak if peak else None,
            "repeats": repeats, "warmup": warmup,
            "ref_max_abs_logit_diff": ref_diff if m == "dlr_ri" else None,
        })
    del live
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        by = {r["method"]: r for r in rows if r["size"] == size}
        entry = {"size": size}
        for num, den in (("dlr", "lowrank"), ("dlr_scatter", "lowrank"), ("dlr_ri", "lowrank"), ("lowrank", "full")):
            if num in by and den in by:
                entry[f"{num}/{den}_time"] = by[num]["ms_per_step"] / by[den]["ms_per_step"]
                entry[f"{num}/{den}_mem"] = by[num]["peak_mem_gib"] / by[den]["peak_mem_gib"]
                entry[f"{num}/{den}_flops"] = by[num]["train_flops_per_token"] / by[den]["train_flops_per_token"]
        out.append(entry)
    return out


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor()
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown(rows: list[dict], rat: list[dict]) -> str:
    lines = ["| size | method | params | ms/step (median) | min–max ms | tokens/s | peak mem (GiB) | MFU | first step (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "—"
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "—"
        lines.append(f"| {r['size']} | {r['method']} | {r['params']:,} | {r['ms_per_step']:.1f} | "
                     f"{r['ms_min']:.1f}–{r['ms_max']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_mem_gib']:.3f} | {mfu} | "
                     f"{first} |")
    cols = ["dlr/lowrank_time", "dlr/lowrank_mem", "dlr_scatter/lowrank_time", "dlr_scatter/lowrank_mem",
            "dlr_ri/lowrank_time", "dlr_ri/lowrank_mem", "lowrank/full_time", "lowrank/full_flops"]
    lines += ["", "| size | " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for e in rat:
        lines.append(f"| {e['size']} | " + " | ".join(f"{e[c]:.3f}" if c in e else "—" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    ap.add_argument("--sizes", default="llama_tiny,llama_60m")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--micro-batch", type=int, default=4, help="0: each size's recipe micro-batch")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="compile as --compile-scope says (dlr-train compile=true, and compile=auto on CUDA, compiles the decoder)")
    ap.add_argument("--compile-scope", default="decoder", choices=tuple(COMPILE_SCOPE),
                    help="decoder: the decoder as one graph, loss outside (dlr-train); layers: each decoder layer; "
                         "model: the whole forward with its loss (plain or chunked loss only)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: none, as dlr-train)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (a Python literal), e.g. --inductor coordinate_descent_tuning=True")
    ap.add_argument("--profile", type=Path, default=None, help="write the top CUDA kernels of one step per method here")
    ap.add_argument("--loss", default="chunked", choices=LOSS_IMPLS, help="the LM loss (dlr-train loss=...); plain = HF logits")
    ap.add_argument("--json", type=Path, default=None, help="also write rows and ratios here")
    ap.add_argument("--_memory-child", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    SCOPE[0], PROFILE[0], MODE[0] = args.compile_scope, args.profile, args.compile_mode
    if args.inductor:
        import torch._inductor.config as inductor_config  # only when asked: importing it is not free

        for item in args.inductor:
            key, _, value = item.partition("=")
            if not hasattr(inductor_config, key):
                sys.exit(f"--inductor {item!r}: torch._inductor.config has no {key!r}")
            try:
                setattr(inductor_config, key, ast.literal_eval(value))
            except (ValueError, SyntaxError):
                sys.exit(f"--inductor {item!r}: {value!r} is not a Python literal; accepted: e.g. True, 4, 'triton'")
    if args._memory_child:
        memory_child(*args._memory_child, args.dtype, args.micro_batch, args.compile, args.loss)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available")
    device = torch.device(args.device)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        sys.exit(f"--methods: unknown {bad}; accepted: {', '.join(METHODS)}")
    rows = []
    for size in args.sizes.split(","):
        batch = args.micro_batch or recipe_micro_batch(size)
        rows += bench_size(size, methods, device, args.dtype, batch, args.warmup, args.repeats, args.compile, args.loss)
        print(f"{size} done", file=sys.stderr, flush=True)
    rat = ratios(rows)
    hw = hardware(device)
    print(f"Hardware: {hw}; {args.dtype}; {'torch.compile' if args.compile else 'eager'}; loss {args.loss}; "
          f"micro-batch {args.micro_batch or 'recipe'} x {SEQ} tokens; "
          f"median of {args.repeats} round-robin steps after {args.warmup} warm-up rounds\n")
    print(markdown(rows, rat))
    ref = [r["ref_max_abs_logit_diff"] for r in rows if r["ref_max_abs_logit_diff"] is not None]
    if ref:
        print(f"dlr_ri vs dlr max |logit difference| with the same weights: {max(ref):.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"hardware": hw, "args": {k: v for k, v in vars(args).items() if k != "json"
                                                                   and not k.startswith("_")},
                                         "rows": rows, "ratios": rat}, indent=2, default=str))


if __name__ == "__main__":
    main()
