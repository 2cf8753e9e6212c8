"""Text corpora (the hub, local JSON lines, Parquet, plain text, mixtures of them) -> token batches.

Public API: `data_spec`, `DataSpec`, `Format` (a kind of document file, see dlr.data.formats), `load_tokenizer`, `check_vocab`, `train_batches`
(`TrainBatches`, resumable), `validation_batches` (the fixed validation set); `TokenBatches` when the data are
`dlr-prepare` token shards (`data=tokens`, see `dlr.data.prepare`).
"""
from dlr.data.batching import TrainBatches, paper_batch, train_batches
from dlr.data.formats import FORMATS, Format, datasets_batches
from dlr.data.sources import resolve_files
from dlr.config.choices import MODES, SOURCES
from dlr.data.spec import DataSpec, data_provenance, data_spec
from dlr.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, bundled_t5_path, check_vocab, load_tokenizer
from dlr.data.token_batches import TokenBatches
from .validation_set import validation_batches, validation_rows

__all__ = [
    "FORMATS", "MODES", "SOURCES", "DataSpec", "Format", "HFTokenizer", "SentencePieceTokenizer", "TokenBatches",
    "Tokenizer", "TrainBatches", "bundled_t5_path", "check_vocab", "data_provenance", "data_spec", "datasets_batches",
    "load_tokenizer", "paper_batch", "resolve_files",
    "train_batches", "validation_batches", "validation_rows",
]
