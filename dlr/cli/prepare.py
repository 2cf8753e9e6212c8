"""dlr-prepare: tokenize a data config once into token shards for `data=tokens`.

    dlr-prepare data=c4_sample out=tokens/c4_sample
    dlr-prepare data=c4_local data.train_files='/data/c4/en/c4-train.*.json.gz' \
        data.validation_files='/data/c4/en/c4-validation.*.json.gz' out=/data/c4_t5 tokens=2000000000 num_proc=8
    dlr-prepare data=c4 out=/data/c4_t5 tokens=2000000000 num_proc=16      # streams from the hub
    dlr-train data=tokens data.path=/data/c4_t5 model=llama_60m

Interrupted? Run the same command again: finished shards are kept. Finished? It does nothing.
"""
from __future__ import annotations

import logging

from dlr.cli._common import from_overrides, run_cli

PROG = "dlr-prepare"
USAGE = __doc__


def prepare_main(args: list[str]) -> int:
    cfg = from_overrides("prepare", args)  # keys, types and ranges: dlr.config.PrepareConfig
    out = cfg.out
    from dlr.data import data_spec
    from dlr.data.prepare import prepare

    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    spec = data_spec(cfg.data)
    manifest = prepare(spec, out, tokens=cfg.tokens, documents=cfg.documents, num_proc=cfg.num_proc,
                       progress=cfg.progress)
    for split, v in manifest["splits"].items():
        print(f"{split}: {v['documents']:,} documents, {v['tokens']:,} tokens in {len(v['shards'])} shard(s)"
              f"{'' if v['complete'] else ' (cut at the limit)'}")
    print(f"{out}: {manifest['dtype']}, tokenizer {manifest['tokenizer']['name']} (sha256 {manifest['tokenizer']['sha256'][:12]})")
    return 0


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, USAGE, prepare_main, argv)


if __name__ == "__main__":
    main()
