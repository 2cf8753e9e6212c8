"""Regenerate the parameter / FLOP table in docs/models.md from the zoo configs."""
from pathlib import Path

from dlr.model.counting import zoo_table

HEADER = """# Model zoo

Every size at its default rank (`dlr-train model=<size>` uses it unless `rank=` is given).
Vocabulary 32000 (T5 SentencePiece: pad 0, eos 1, no bos), untied embeddings, RMSNorm eps
1e-6, SiLU MLP, SDPA attention. "Low-rank" covers both `lowrank` and `dlr`: the DLR
residual has no parameters and folds into B, so train and deploy counts are the same.

- params: every trainable parameter; non-emb: without the input embedding and lm_head.
- FLOPs per token, forward, sequence length 256, PaLM/MFU convention:
  2 x (matmul params incl. lm_head) + 4 x layers x seq_len x hidden. Training = 3 x forward.
- Closed form, checked in `tests/test_model.py`: per layer, full projections
  4h^2 + 3hi; low-rank 8rh + 3r(h + i); plus 2h norm weights per layer, h for the final
  norm, and 2Vh for embedding + lm_head.

Regenerate with `python scripts/model_table.py`.

"""


def main() -> None:
    Path("docs/models.md").write_text(HEADER + zoo_table())


if __name__ == "__main__":
    main()
