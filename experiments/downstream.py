"""docs/downstream.md, reproduced: full vs lowrank vs folded dlr through the bundled task and a
tiny fine-tuning, before and after. CPU-sized by default (llama_demo, bundled C4 sample).

    python -m experiments.downstream                      # runs/downstream/, prints the table
    python -m experiments.downstream pretrain_steps=400 sft_steps=160

Runs the real commands a user would type: dlr-train, dlr-eval tasks=c4_cloze, dlr-finetune.
The fine-tuning data are next-sentence pairs made from the C4 *train* documents
(scripts/make_c4_cloze.py sft=...), the task items from the *validation* documents.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from dlr.config import METHODS

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"pretrain_steps": 100, "sft_steps": 80, "sft_lr": 1e-3, "sft_batch": 16, "out": "runs/downstream"}


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(ckpt: Path, out: Path) -> dict:
    run(str(BIN / "dlr-eval"), f"ckpt={ckpt}", "tasks=c4_cloze", "data=c4_sample", "progress=false", f"out={out}")
    res = json.loads(out.read_text())
    return {"val_ppl": res["val_ppl"], **{k: res["tasks"]["c4_cloze"][k] for k in
                                           ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples")}}


def main() -> None:
    opts = dict(DEFAULTS)
    for arg in sys.argv[1:]:
        key, _, value = arg.partition("=")
        if key not in opts:
            raise SystemExit(f"downstream.py: unknown option {key!r}; accepted: {', '.join(opts)}")
        opts[key] = type(DEFAULTS[key])(value)
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    sft = out / "sft_train.jsonl"
    run(sys.executable, str(ROOT / "scripts" / "make_c4_cloze.py"), f"sft={sft}")
    results = {"options": opts, "runs": {}}
    for method in METHODS:
        t0 = time.time()
        run_dir = out / method
        run(str(BIN / "dlr-train"), "--config-name", "demo", f"method={method}", f"steps={opts['pretrain_steps']}",
            f"out_dir={run_dir}", "eval_every=1000000", f"save_every={opts['pretrain_steps']}")
        ckpt = run_dir / ("folded" if method == "dlr" else "final")
        summary = json.loads((run_dir / "summary.json").read_text())
        before = evaluate(ckpt, run_dir / "eval_before.json")
        sft_dir = out / f"{method}-sft"
        run(str(BIN / "dlr-finetune"), f"ckpt={ckpt}", f"data={sft}", f"out_dir={sft_dir}", f"steps={opts['sft_steps']}",
            f"lr={opts['sft_lr']}", f"batch_size={opts['sft_batch']}", "save_every=1000000", "progress=false",
            "resume=never")
        sft_summary = json.loads((sft_dir / "summary.json").read_text())
        after = evaluate(sft_dir / "final", sft_dir / "eval_after.json")
        results["runs"][method] = {
            "ckpt": str(ckpt), "deploy_params": summary["deploy_params"], "pretrain_tokens": summary["tokens"],
            "before": before, "after": after, "sft_train_loss": sft_summary["train_loss"],
            "sft_params": sft_summary["params"], "seconds": round(time.time() - t0, 1)}
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = ["| model | params | C4 val ppl before / after | c4_cloze acc before | acc after | acc_norm before | acc_norm after |",
             "|---|---|---|---|---|---|---|"]
    for method, r in results["runs"].items():
        b, a = r["before"], r["after"]
        name = "dlr (folded)" if method == "dlr" else method
        lines.append(f"| {name} | {r['deploy_params']:,} | {b['val_ppl']:.1f} / {a['val_ppl']:.1f} | "
                     f"{b['acc']:.3f} ± {b['acc_stderr']:.3f} | {a['acc']:.3f} ± {a['acc_stderr']:.3f} | "
                     f"{b['acc_norm']:.3f} ± {b['acc_norm_stderr']:.3f} | {a['acc_norm']:.3f} ± {a['acc_norm_stderr']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
