"""Tests never touch the network: hub, datasets and wandb are offline for every test."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (after the offline environment is set)


@pytest.fixture(scope="module")
def tok():
    """The bundled T5 SentencePiece tokenizer."""
    from dlr.data import load_tokenizer

    return load_tokenizer("t5")
