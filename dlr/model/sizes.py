"""The LLaMA sizes. The Hydra model configs (configs/model/*.yaml) are the single source."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

from ..config import ModelConfig
from ..errors import bad_value

# The T5 SentencePiece tokenizer GaLore's and CoLA's C4 code uses: 32000 pieces, pad 0, eos 1, no bos.
VOCAB_SIZE = 32000
PAD_ID = 0
EOS_ID = 1


@dataclass(frozen=True)
class LlamaSize:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int
    default_rank: int


def _model_dir():
    return resources.files("dlr.configs") / "model"


def size_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _model_dir().iterdir() if p.name.endswith(".yaml"))


def _size_file(name: str) -> dict:
    names = size_names()
    if name not in names:
        raise bad_value("model", name, names)
    return yaml.safe_load((_model_dir() / f"{name}.yaml").read_text())


def get_size(name: str) -> LlamaSize:
    return size_from_mapping(_size_file(name)["model"])


def recipe(name: str) -> dict:
    """The size's training recipe: the schedule defaults its file sets (steps, lr, global_batch, micro_batch)."""
    return dict(_size_file(name)["schedule"])


def size_from_mapping(model: ModelConfig | dict) -> LlamaSize:
    """The size a `model` section describes (a ModelConfig or a plain dict), so CLI overrides of dims apply."""
    get = model.__getitem__ if isinstance(model, dict) else lambda k: getattr(model, k)
    return LlamaSize(**{k: get(k) for k in LlamaSize.__dataclass_fields__})
