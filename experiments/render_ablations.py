"""Write docs/ablations.md (and docs/ablations/) from the results of experiments/study.py.

    python -m experiments.render_ablations runs/studies            # a study --out directory
    tar xzf study_bundle.tar.gz -C /tmp && python -m experiments.render_ablations /tmp/study
    python -m experiments.render_ablations                          # no results yet: the page says so

Every number on the page comes from the study directory (studies/<name>/by_<key>.csv and
manifest.json); the "reading" of each value is the interval's, not ours: a paired
difference whose 95% t-interval contains 0 is reported as no difference.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

from experiments.study import BASE, ORDER, STUDIES

REPO = Path(__file__).resolve().parent.parent

INTRO = """# Ablations: how the DLR gain depends on alpha and the other choices

The question: on the same data, budget and seeds, which settings of the DLR residual lower the
validation perplexity of low-rank pre-training, and by how much compared with the spread over
seeds? Each study below sweeps one setting with everything else at the base setting (alpha 1,
variance correction on, all 7 projections, uniform expansion, the model's default rank), runs
every value with at least 3 seeds, and compares it seed by seed with lowrank (same init and data
order for the same seed).

How to read the tables: "mean ± 95% CI" is a t-interval over seeds; "minus lowrank" is the
per-seed paired difference (dlr − lowrank, negative = dlr better) with its own 95% t-interval.
**A difference whose interval contains 0 is no difference** at this number of seeds, and the
"reading" column says so. With 3 seeds the t quantile is 4.30, so only consistent differences
clear it.
"""

REPRODUCE = """## Reproduce

```bash
python -m experiments.study all --device cuda --jobs 12   # 45 runs; alpha first; resumable
python -m experiments.study alpha                         # one study, on CPU (slow: hours)
python -m experiments.study all --dry-run                 # the runs and their names
python -m experiments.render_ablations runs/studies       # this page
dlr-compare runs/studies/runs/lowrank-r32-s* runs/studies/runs/dlr-r32-a*-vc1-all-uniform-s* by=alpha
```

`experiments/study.py` runs `dlr-train model=llama_demo data=c4_sample` per run (the docs/results.md
budget: 300 steps x 32 sequences x 256 tokens, lr 3e-3, AdamW, cosine, eval every 50 steps on
the whole held-out split, bf16 autocast on a GPU), skips finished runs, resumes interrupted ones,
then `dlr-compare by=KEY` per study. `expand=random_reuse` is the reference implementation's
ablation (each output draws its latent with replacement, seeded per layer); `expand=permuted` is
the balanced permutation (every latent keeps its multiplicity).

**Caveat on scale.** llama_demo is a 9M-parameter model (most of it embeddings), trained on 2.5M
tokens that repeat a 460k-token sample about 5 times. A difference, or none, here says little
about the paper's 60M-1B models; it shows how the knobs behave and what the seed spread is.
"""


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.is_file() else []


def reading(study_name: str, rows: list[dict]) -> str:
    key = STUDIES[study_name].key
    by_verdict: dict[str, list[str]] = {}
    for r in rows:
        if r["method"] == "dlr" and r["reading"] not in ("—", ""):
            by_verdict.setdefault(r["reading"], []).append(r[key])
    if not by_verdict:
        return "no paired interval (fewer than 2 seeds per value)."
    parts = []
    for verdict, text in (("lower", "dlr is lower than lowrank beyond its 95% interval"),
                          ("higher", "dlr is higher than lowrank beyond its 95% interval"),
                          ("no difference", "the interval of the difference contains 0 (no difference)")):
        if verdict in by_verdict:
            parts.append(f"{text} at {key} = {', '.join(by_verdict[verdict])}")
    return "; ".join(parts) + "."


def render(study_dir: Path | None, doc: Path, assets: Path) -> str:
    manifest = {}
    if study_dir is not None and (study_dir / "manifest.json").is_file():
        manifest = json.loads((study_dir / "manifest.json").read_text())
    if assets.exists():
        shutil.rmtree(assets)
    lines = [INTRO]
    if manifest:
        args = manifest.get("args", {})
        where = manifest.get("gpu") or f"CPU ({manifest.get('cpu_count')} cores)"
        lines.append(f"> **Status:** run on {where}, torch {manifest.get('torch')}, "
                     f"{len(manifest.get('finished', []))} finished runs "
                     f"({args.get('jobs')} at a time); model {args.get('model')}, "
                     f"{args.get('steps')} steps x {args.get('global_batch')} sequences, lr {args.get('lr')}, seeds "
                     f"{args.get('seeds')}. The files behind this page are in [docs/ablations/](ablations/).\n")
    else:
        lines.append("> **Status: the GPU results are not in yet.** The study is defined and tested end to end "
                     "(tiny CPU runs in tests/test_study.py); the tables below fill in when "
                     "`python -m experiments.render_ablations <study dir>` is run on its results. Nothing on this "
                     "page is a measured number until then.\n")
    lines.append(f"Base setting: {', '.join(f'{k}={v}' for k, v in BASE.items())}, rank = the model's default_rank.\n")
    summary = [(name, reading(name, _rows(study_dir / "studies" / name / f"by_{STUDIES[name].key}.csv")))
               for name in ORDER if study_dir is not None and (study_dir / "studies" / name).is_dir()]
    if summary:
        lines.append("## Summary\n")
        lines.append("Each study's reading, generated from its intervals (details and per-seed numbers below):\n")
        lines += [f"- **{name}**: {text}" for name, text in summary]
        lines.append("")
    for name in ORDER:
        st = STUDIES[name]
        lines.append(f"## {name}: {st.doc}\n")
        values = ", ".join(str(v) for v in st.values)
        lines.append(f"`{st.key}` in {{{values}}}" + (", lowrank and dlr at each" if st.both_methods else ", lowrank as the band")
                     + f"; `dlr-compare by={st.key}`.\n")
        src = study_dir / "studies" / name if study_dir is not None else None
        md = src / f"by_{st.key}.md" if src is not None else None
        if md is None or not md.is_file():
            lines.append("*Not run yet.*\n")
            continue
        dest = assets / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in (f"by_{st.key}.md", f"by_{st.key}.csv", f"by_{st.key}.png", "table.md"):
            if (src / f).is_file():
                shutil.copy2(src / f, dest / f)
        if (src / f"by_{st.key}.png").is_file():
            lines.append(f"![{name}](ablations/{name}/by_{st.key}.png)\n")
        lines.append(md.read_text())
        lines.append("Reading, from the intervals: " + reading(name, _rows(src / f"by_{st.key}.csv")) + "\n")
    if manifest:
        assets.mkdir(parents=True, exist_ok=True)
        (assets / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    lines.append(REPRODUCE)
    text = "\n".join(lines)
    doc.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir", nargs="?", type=Path, default=None, help="experiments/study.py --out (or the extracted bundle)")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "ablations.md")
    ap.add_argument("--assets", type=Path, default=REPO / "docs" / "ablations")
    args = ap.parse_args(argv)
    if args.study_dir is not None and not (args.study_dir / "studies").is_dir():
        sys.exit(f"render_ablations.py: error: {str(args.study_dir)!r} holds no studies/ (a experiments/study.py --out "
                 "directory, or the extracted study_bundle.tar.gz)")
    render(args.study_dir, args.doc, args.assets)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
