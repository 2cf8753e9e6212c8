"""Corpus perplexity done right: a sliding-window evaluation over the whole concatenated corpus.

The fixed validation set (`dlr.data.validation_batches`) is the pre-training protocol: the first
`val_tokens` tokens of C4 validation, one document per row cut at `seq_len` (paper mode). On a
corpus such as WikiText that protocol measures almost nothing: a file whose blank lines hold a
space is one "paragraph", cut to 256 tokens. The standard protocol for corpus perplexity (the
one of the transformers perplexity guide and of GPT-2's WikiText numbers) is used here instead:

- the corpus is one token stream: `EOS doc_1 EOS doc_2 ...` (a text file is one document; for
  JSON sources each record is). The leading EOS is the document-boundary context the models
  were trained with (no BOS), so the very first token is scored too;
- windows of `window` tokens move by `stride` tokens; each scores only the tokens the
  previous window did not, so every token is scored exactly once, with at least
  `window - stride` tokens of context (fewer only inside the first window);
- the loss is summed over tokens (`dlr.eval.loss.evaluate`, token-weighted, all-reduced),
  so token perplexity = exp(sum NLL / tokens), word perplexity = exp(sum NLL / words) and
  bits per byte = sum NLL / (ln 2 * UTF-8 bytes), the last two tokenizer-independent.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dlr.data.formats import format_of, open_text, source_kind
from dlr.data.sources import check_local_file, iter_part, split_parts
from dlr.data.spec import DataSpec
from dlr.data.tokenizer import Tokenizer
from dlr.errors import ConfigError

_CHUNK_CHARS = 1 << 20  # a big file is tokenized in ~1 MB pieces cut at line ends


@dataclass(frozen=True)
class Corpus:
    """The token stream of a corpus, `EOS doc_1 EOS doc_2 ...`, possibly cut to a budget."""

    ids: torch.Tensor  # 1-D int64; ids[0] is the leading EOS (context, never scored)
    corpus_tokens: int  # tokens of the whole corpus (documents + separating EOS), before any budget
    words: int  # whitespace-separated words of the whole corpus
    bytes: int  # UTF-8 bytes of the whole corpus
    documents: int
    files: tuple[str, ...]
    complete: bool  # False when a hub/JSON source was read only up to the budget

    @property
    def scored_tokens(self) -> int:
        return int(self.ids.numel()) - 1


def _read_text_file(path: str) -> Iterator[str]:
    """A whole text file, in pieces cut after a newline (SentencePiece starts a word after
    whitespace anyway, so the ids equal those of the file tokenized in one piece)."""
    with open_text(path) as f:
        buf = io.StringIO()
        size = 0
        for line in f:
            buf.write(line)
            size += len(line)
            if size >= _CHUNK_CHARS:
                yield buf.getvalue()
                buf, size = io.StringIO(), 0
        if size:
            yield buf.getvalue()


def _documents(spec: DataSpec) -> Iterator[list[str]]:
    """Each document as a list of text pieces: a whole text file, or one record (JSON, Parquet)."""
    for part in split_parts(spec, "validation"):
        if format_of(spec, part.path).whole_file_documents and spec.holdout is None:
            pieces = [p for p in _read_text_file(part.path)]
            if any(p.strip() for p in pieces):
                yield pieces
        else:
            for _, text in iter_part(spec, part):
                yield [text]


def load_corpus(spec: DataSpec, tokenizer: Tokenizer, budget: int | None = None) -> Corpus:
    """Tokenize the validation split of `spec` into one stream (see module doc).

    `budget` caps the scored tokens. A text corpus is always read to its end, so the share
    that the budget leaves out is known; a hub/JSON split stops at the budget.
    """
    files = [p.path for p in split_parts(spec, "validation")]
    for f in files:
        check_local_file(spec, f)
    eos = tokenizer.eos_id
    stream: list[int] = [eos]
    total = words = nbytes = docs = 0
    read_all = source_kind(spec.source).corpus
    complete = True
    for pieces in _documents(spec):
        if docs:
            doc_ids = [eos]  # the separator is a real token the model must predict
        else:
            doc_ids = []
        for ids in tokenizer.encode_batch(pieces):
            doc_ids.extend(ids)
        docs += 1
        total += len(doc_ids)
        words += sum(len(p.split()) for p in pieces)
        nbytes += sum(len(p.encode("utf-8")) for p in pieces) + (1 if docs > 1 else 0)
        if budget is None or len(stream) - 1 < budget:
            stream.extend(doc_ids)
        if budget is not None and total >= budget and not read_all:
            complete = False
            break
    if docs == 0:
        raise ConfigError(f"the validation split has no text (files: {', '.join(files[:3])})")
    if budget is not None:
        stream = stream[: budget + 1]
    return Corpus(ids=torch.tensor(stream, dtype=torch.int64), corpus_tokens=total, words=words, bytes=nbytes,
                  documents=docs, files=tuple(files), complete=complete)


def check_window(window: int, stride: int) -> None:
    for key, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}={v!r} is not valid; accepted: an integer >= 1")
    if window < 2:
        raise ConfigError(f"window={window} is not valid; accepted: an integer >= 2")
    if stride >= window:
        raise ConfigError(f"stride={stride} is not valid; accepted: 1 <= stride < window ({window}): a window "
                          "needs at least one token of context before the tokens it scores")


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of `n` ids whose
    positions 1..n-1 are scored: every one exactly once. The first window scores its
    `window - 1` tokens; each later one scores the next `stride` tokens after
    `window - stride` tokens of context (the last one may score fewer)."""
    check_window(window, stride)
    if n < 2:
        return []
    end = min(window, n)
    spans = [(0, end, 1)]
    while end < n:
        first, end = end, min(end + stride, n)
        spans.append((max(0, end - window), end, first))
    return spans


def sliding_batches(ids: torch.Tensor, window: int, stride: int, batch_size: int, pad_id: int, *,
                    process_index: int = 0, num_processes: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """This process's windows (every num_processes-th), as {"input_ids", "labels"} rows of `window`
    (right-padded, -100 on context and padding), for `dlr.eval.loss.evaluate`."""
    spans = window_spans(int(ids.numel()), window, stride)[process_index::num_processes]
    for i in range(0, len(spans), batch_size):
        chunk = spans[i: i + batch_size]
        x = torch.full((len(chunk), window), pad_id, dtype=torch.int64)
        y = torch.full((len(chunk), window), -100, dtype=torch.int64)
        for r, (b, e, first) in enumerate(chunk):
            x[r, : e - b] = ids[b:e]
            y[r, first - b: e - b] = ids[first:e]  # evaluate() scores labels[:, 1:]: first - b >= 1
        yield {"input_ids": x, "labels": y}


@dataclass(frozen=True)
class CorpusMetrics:
    """What the sliding protocol adds to the token-weighted loss. The word and byte figures are
    None unless the whole corpus was scored: a share of them would not be comparable."""

    token_ppl: float
    scored_tokens: int
    corpus_tokens: int | None  # None when a hub/JSON split was read only up to the budget
    documents: int
    words: int | None
    word_ppl: float | None
    bytes: int | None
    bits_per_byte: float | None


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def corpus_metrics(loss: float, scored: int, corpus: Corpus) -> CorpusMetrics:
    """Token perplexity; word perplexity and bits per byte when the whole corpus was scored."""
    whole = corpus.complete and scored == corpus.corpus_tokens
    nll = loss * scored
    return CorpusMetrics(
        token_ppl=_exp(loss), scored_tokens=scored, corpus_tokens=corpus.corpus_tokens if corpus.complete else None,
        documents=corpus.documents, words=corpus.words if whole else None,
        word_ppl=_exp(nll / corpus.words) if whole and corpus.words else None,
        bytes=corpus.bytes if whole else None,
        bits_per_byte=nll / (math.log(2) * corpus.bytes) if whole and corpus.bytes else None,
    )


def split_tokens(spec: DataSpec, tokenizer: Tokenizer) -> int:
    """Tokens of the validation split as the row protocol sees it: every document + its EOS."""
    n = 0
    for part in split_parts(spec, "validation"):
        texts = [t for _, t in iter_part(spec, part)]
        for i in range(0, len(texts), 256):
            n += sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts[i: i + 256]))
    return n


def check_coverage(scored: int, total: int, min_coverage: float, how: str, fix: str) -> None:
    """An evaluation that scores too little of the corpus is an error, not a warning."""
    if total <= 0:
        return
    share = scored / total
    if share < min_coverage:
        raise ConfigError(
            f"{how} would score {scored:,} of the corpus's {total:,} tokens ({share:.1%}), below "
            f"min_coverage={min_coverage}; {fix}, or lower min_coverage if a partial measurement is really meant"
        )
