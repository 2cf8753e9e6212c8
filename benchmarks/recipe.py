"""The geometry every benchmark shares with `dlr-train`: the sequence length and each size's micro-batch."""
from __future__ import annotations

from dlr.model.sizes import recipe

SEQ = 256  # the zoo's sequence length (configs/data/*.yaml seq_len)


def recipe_micro_batch(size: str) -> int:
    """The micro-batch `dlr-train model=<size>` runs with (configs/model/<size>.yaml)."""
    return int(recipe(size)["micro_batch"])
