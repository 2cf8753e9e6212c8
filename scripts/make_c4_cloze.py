"""Build the bundled lm-evaluation-harness task `c4_cloze` from the bundled C4 validation documents.

    python scripts/make_c4_cloze.py      # rewrites dlr/assets/tasks/c4_cloze/c4_cloze.jsonl (deterministic)
    python scripts/make_c4_cloze.py sft=runs/c4_next_sentence.jsonl   # also: prompt/response pairs
                                                                       # from the *train* documents, for dlr-finetune

A next-sentence choice task in the style of HellaSwag / the ROCStories cloze test: the
context is the opening sentences of a C4 validation document, the gold ending is the
sentence that follows it, and three distractors are sentences of similar length taken from
other documents. Chance is 25%. Data: allenai/c4 `en` validation (ODC-BY 1.0; see
dlr/assets/NOTICE.md), the 200 documents already bundled in dlr/assets/c4_sample.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "dlr/assets/c4_sample/c4-validation.00000-of-00001.json.gz"
OUT = ROOT / "dlr/assets/tasks/c4_cloze/c4_cloze.jsonl"
SEED = 1234
CHOICES = 4
# A sentence ends at . ! or ? followed by whitespace and an upper-case letter or a quote.
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(text: str) -> list[str]:
    out = []
    for para in text.split("\n"):
        out += [s.strip() for s in _SPLIT.split(para) if s.strip()]
    return out


def ok(sentence: str) -> bool:
    n = len(sentence.split())
    return 6 <= n <= 40 and sentence[0].isupper() and sentence[-1] in ".!?"


def build(src: Path = SRC) -> list[dict]:
    with gzip.open(src, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    split = [sentences(d) for d in docs]
    pool = [(i, s) for i, ss in enumerate(split) for s in ss if ok(s)]
    rng = random.Random(SEED)
    items = []
    for i, ss in enumerate(split):
        # Context: the opening sentences up to ~60 words (at least one); gold: the next one.
        ctx, words = [], 0
        for s in ss:
            if ctx and words + len(s.split()) > 60:
                break
            ctx.append(s)
            words += len(s.split())
        if len(ctx) >= len(ss) or not ok(ss[len(ctx)]):
            continue
        gold = ss[len(ctx)]
        n = len(gold.split())
        near = [s for j, s in pool if j != i and abs(len(s.split()) - n) <= max(3, n // 4) and s != gold]
        if len(near) < CHOICES - 1:
            continue
        distractors = rng.sample(near, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [gold] + distractors[label:]
        items.append({"id": i, "context": " ".join(ctx), "choices": choices, "label": label})
    return items


def main() -> None:
    import sys

    for arg in sys.argv[1:]:
        if not arg.startswith("sft="):
            raise SystemExit(f"make_c4_cloze.py: unknown argument {arg!r}; accepted: sft=PATH.jsonl")
        # Same construction on the train split (disjoint from the task's documents): the
        # context is the prompt, the true next sentence the response.
        path = Path(arg[4:])
        pairs = build(SRC.with_name("c4-train.00000-of-00001.json.gz"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for it in pairs:
                f.write(json.dumps({"prompt": it["context"], "response": " " + it["choices"][it["label"]]},
                                   ensure_ascii=False) + "\n")
        print(f"{len(pairs)} prompt/response pairs -> {path}")
    items = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    print(f"{len(items)} items -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
