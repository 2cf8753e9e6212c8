"""Wrong gradients from torch.compiler.nested_compile_region under inductor (found on torch 2.13, CPU).

A region that saves its input for backward returns that input to the outer graph as a
saved-for-backward output, aliasing it. Inductor's memory planner does not see the alias: after
the input's last visible reader (the region call) it reuses the input's buffer for a later tensor
of the same size (`bufN = bufM; del bufM  # reuse` in the generated code), so the region's backward
reads that tensor instead of its input. The loss is unchanged; the gradients of that region and of
everything before it are wrong. aot_eager is exact; inductor with allow_buffer_reuse=False (and
inplace_buffers=False, as dlr.train.loop.REGION_INDUCTOR_OPTIONS) is exact.

Two cases, each compiled with inductor's default options and with dlr's workaround:
- toy: x -> layer(layer(2x, w1), w2) -> cos, layer(h, w) = h + sin(h) @ w as the region (torch only);
- llama_tiny dlr: the trainer's one-graph decoder with the decoder layer as the region.
Prints the max relative gradient error (max |g - g_eager| / max |g_eager|) per parameter group.
Exit status: 0 when every gradient equals eager's (rel <= 1e-5): the bug is fixed and the
workaround could go; 1 when only the default options are wrong (the bug is there, the workaround
holds); 2 when the workaround is wrong too.

    OMP_NUM_THREADS=2 python scripts/repro_nested_compile_region.py      # ~1 min on 2 CPU cores
"""
from __future__ import annotations

import copy
import os
import sys
import warnings

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # compile for real, every case

import torch  # noqa: E402

warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")

TOL = 1e-5


def toy_case(options: dict | None) -> dict[str, float]:
    torch.manual_seed(0)
    w1, w2 = (torch.randn(8, 8, requires_grad=True) for _ in range(2))
    x = torch.randn(4, 8, requires_grad=True)
    proj = torch.randn(4, 8)

    def layer(h, w):
        return h + torch.sin(h) @ w  # saves its input h for backward

    def model(layer):
        return lambda x, w1, w2: torch.cos(layer(layer(x * 2, w1), w2))  # an output the size of h

    region = torch.compiler.nested_compile_region(layer)
    compiled = torch.compile(model(region), fullgraph=True, options=options)
    ref = torch.autograd.grad((model(layer)(x, w1, w2) * proj).sum(), (x, w1, w2))
    out = torch.autograd.grad((compiled(x, w1, w2) * proj).sum(), (x, w1, w2))
    torch._dynamo.reset()
    return {name: rel_error(a, b) for name, a, b in zip(("x", "w1 (region 1)", "w2 (region 2)"), ref, out)}


def llama_case(options: dict | None) -> dict[str, float]:
    import dlr
    from dlr.train.loop import _layer_region

    torch.manual_seed(0)
    eager = dlr.build_model("llama_tiny", "dlr")
    compiled = copy.deepcopy(eager)
    for layer in compiled.model.layers:
        layer.__class__ = _layer_region(type(layer))
    compiled.model.compile(options=options)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (eager, compiled):
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(dict(model.named_parameters()))
    torch._dynamo.reset()
    errors: dict[str, float] = {}
    for name, p in grads[0].items():
        group = ".".join(name.split(".")[:3]) if ".layers." in name else name
        errors[group] = max(errors.get(group, 0.0), rel_error(p.grad, grads[1][name].grad))
    return errors


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def main() -> int:
    from dlr.train.loop import REGION_INDUCTOR_OPTIONS

    print(f"torch {torch.__version__}; inductor on {torch.device('cpu')}; fp32")
    wrong = {}
    for label, options in (("default options", None), ("dlr workaround", REGION_INDUCTOR_OPTIONS)):
        for case in (toy_case, llama_case):
            errors = case(options)
            worst = max(errors.values())
            wrong[label] = wrong.get(label, False) or worst > TOL
            print(f"\n{case.__name__} with {label} {options or ''}: {'WRONG' if worst > TOL else 'ok'} (worst {worst:.3g})")
            for group, err in errors.items():
                print(f"  {group:32s} {err:.3g}")
    return 2 if wrong["dlr workaround"] else int(wrong["default options"])


if __name__ == "__main__":
    sys.exit(main())
