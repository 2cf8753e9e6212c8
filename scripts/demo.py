"""The README demo: low-rank vs DLR on the bundled C4 sample, evaluated, folded, compared.

Runs the real commands a user would type (dlr-train, dlr-eval) so the demo exercises
the product end to end. Extra arguments are passed to both training runs, e.g.
`python scripts/demo.py steps=200`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    extra = sys.argv[1:]
    results = {}
    for method in ("lowrank", "dlr"):
        out = Path("runs/demo") / f"{method}-s0"
        shutil.rmtree(out, ignore_errors=True)  # the demo always starts fresh
        run(str(BIN / "dlr-train"), "--config-name", "demo", f"method={method}", f"out_dir={out}", *extra)
        results[method] = json.loads((out / "summary.json").read_text())
    # The trainer evaluated the unfolded model; dlr-eval, a separate program, reads the
    # folded directory back from disk: agreement shows the fold and the format are exact.
    dlr_dir = Path("runs/demo/dlr-s0")
    run(str(BIN / "dlr-eval"), f"ckpt={dlr_dir / 'folded'}", "data=c4_sample", f"out={dlr_dir / 'eval_folded.json'}")
    folded = json.loads((dlr_dir / "eval_folded.json").read_text())
    unfolded = {"val_ppl": results["dlr"]["val_ppl"]}

    low, dlr = results["lowrank"], results["dlr"]
    print("\n== dlr demo: llama_demo on the bundled C4 sample (validation split) ==")
    print(f"{'run':<28}{'val ppl':>12}{'params':>14}{'tokens':>10}")
    print(f"{'lowrank (r=%d)' % low['rank']:<28}{low['val_ppl']:>12.2f}{low['deploy_params']:>14,}{low['tokens']:>10,}")
    print(f"{'dlr (r=%d, alpha=%g)' % (dlr['rank'], dlr['alpha']):<28}{dlr['val_ppl']:>12.2f}{dlr['train_params']:>14,}{dlr['tokens']:>10,}")
    print(f"{'dlr folded (dlr-eval)':<28}{folded['val_ppl']:>12.2f}{dlr['deploy_params']:>14,}")
    rel = abs(folded["val_ppl"] - unfolded["val_ppl"]) / unfolded["val_ppl"]
    print(f"\nfolded (dlr-eval) vs unfolded (dlr-train) perplexity: {folded['val_ppl']:.4f} vs {unfolded['val_ppl']:.4f} (relative difference {rel:.1e})")
    print(f"the folded DLR model has exactly the low-rank model's parameters: {dlr['deploy_params'] == low['deploy_params']}")
    if rel > 1e-4:
        sys.exit("folded and unfolded perplexities disagree: the fold is broken")


if __name__ == "__main__":
    main()
