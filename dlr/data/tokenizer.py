"""Tokenizers: the bundled T5 SentencePiece model (what GaLore and CoLA train with) or any HF tokenizer."""
from __future__ import annotations

import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Protocol

from dlr.errors import ConfigError

log = logging.getLogger(__name__)

T5_NAME = "t5"
SPIECE = "spiece.model"
HF_CONFIG = "tokenizer_config.json"
# Written into the tokenizer_config.json that `SentencePieceTokenizer.save` writes next to
# spiece.model, so `load_tokenizer` knows the HF files are a derived copy of that model.
DERIVED_MARK = "dlr_sentencepiece"
# Checked on every conversion: the HF copy must give the ids SentencePiece gives.
_PROBES = (
    "Beginners BBQ Class Taking Place in Missoula!",
    "  Two  spaces, tabs\tand\nnewlines; digits 3.14159 and €, ü, 日本語.",
    "<b>markup</b> & URLs: https://example.com/a?b=c#d -- done.",
)


def bundled_t5_path() -> Path:
    return Path(str(resources.files("dlr.assets").joinpath("tokenizer", "t5", SPIECE)))


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


class SentencePieceTokenizer:
    """SentencePiece model without BOS; EOS is appended by the batching code, not here."""

    def __init__(self, model_file: str | os.PathLike, num_threads: int = -1) -> None:
        import sentencepiece as spm

        self.model_file = str(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with C++ text
            raise ConfigError(f"tokenizer file {self.model_file!r} is not a SentencePiece model ({type(e).__name__})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        # T5 has pad=0; models without a pad piece pad with EOS (labels mask it anyway).
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id
        if self.eos_id < 0:
            raise ConfigError(f"tokenizer {self.model_file!r} has no EOS piece; packing and paper mode need one")
        self.num_threads = num_threads

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def save(self, directory: str | os.PathLike) -> None:
        """spiece.model, plus tokenizer.json + tokenizer_config.json for `AutoTokenizer`.

        transformers 5 no longer reads a bare spiece.model through `AutoTokenizer` ("Couldn't
        instantiate the backend tokenizer"): it needs a class name, and its `T5Tokenizer`
        would add 100 sentinel ids (vocab 32100 instead of the model's 32000) and append
        `</s>` to every prompt, wrong for a causal LM. So we convert the model once to a
        `tokenizers` Unigram (same pieces, same normalizer) without sentinels and without
        the EOS post-processor, check it gives SentencePiece's ids, and save it as a plain
        `PreTrainedTokenizerFast`, a class every transformers >= 4 loads.
        """
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, SPIECE)
        if not (os.path.exists(target) and os.path.samefile(self.model_file, target)):  # re-saving in place
            shutil.copyfile(self.model_file, target)
        hf = self.hf_tokenizer()
        if hf is None:
            return
        hf.save_pretrained(str(directory))
        cfg_path = os.path.join(directory, HF_CONFIG)
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        # transformers 5 writes its own backend class name, which 4.x cannot resolve.
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("is_local", "local_files_only", "name_or_path"):  # leaked loading kwargs
            cfg.pop(key, None)
        cfg[DERIVED_MARK] = SPIECE
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")

    def hf_tokenizer(self):
        """The same tokenizer as a `transformers` fast tokenizer (cached), or None with a warning
        when this SentencePiece model has no exact `tokenizers` equivalent (not T5's layout)."""
        if not hasattr(self, "_hf"):
            self._hf = self._convert()
        return self._hf

    def _convert(self):
        import tempfile

        from tokenizers import decoders
        from transformers import PreTrainedTokenizerFast, T5Tokenizer

        sp = self._sp
        layout = (sp.pad_id(), sp.eos_id(), sp.unk_id())
        if layout != (0, 1, 2) or sp.bos_id() >= 0:
            log.warning("%s: no tokenizer.json written (SentencePiece layout pad/eos/unk=%s, bos=%d is not T5's); "
                        "load it with sentencepiece or dlr.data.load_tokenizer", self.model_file, layout, sp.bos_id())
            return None
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(self.model_file, os.path.join(tmp, SPIECE))
            t5 = T5Tokenizer.from_pretrained(tmp, extra_ids=0)
        backend = t5.backend_tokenizer
        backend.post_processor = None  # no `</s>` after every text: prompts of a causal LM end open
        # Keep a word's leading space when decoding: transformers' text-generation pipeline decodes
        # the new tokens alone and appends them to the prompt, and T5's decoder drops the space of
        # the first piece ("The weather today is" + "the"). A decoded whole text therefore starts
        # with the space SentencePiece puts before its first word.
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=sp.id_to_piece(sp.eos_id()),
                                     pad_token=sp.id_to_piece(sp.pad_id()), unk_token=sp.id_to_piece(sp.unk_id()))
        for text in _PROBES:
            want, got = self._sp.encode(text), hf(text, add_special_tokens=True)["input_ids"]
            if want != got:
                log.warning("%s: no tokenizer.json written (the converted tokenizer gives %s for %r, SentencePiece %s)",
                            self.model_file, got[:8], text[:20], want[:8])
                return None
        if len(hf) != self.vocab_size:
            log.warning("%s: no tokenizer.json written (converted vocab %d != %d)", self.model_file, len(hf), self.vocab_size)
            return None
        return hf

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """Any `transformers` tokenizer; special tokens are not added (we append EOS ourselves)."""

    def __init__(self, name_or_path: str) -> None:
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"tokenizer={name_or_path!r} could not be loaded ({msg[:200]}); accepted: 't5' (bundled), "
                "a Hugging Face tokenizer name (needs the hub), or a local tokenizer directory"
            ) from None
        self.name_or_path = name_or_path
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ConfigError(f"tokenizer={name_or_path!r} has no EOS token; packing and paper mode need one")
        self.eos_id = int(eos)
        self.pad_id = int(self._tok.pad_token_id) if self._tok.pad_token_id is not None else self.eos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, directory: str | os.PathLike) -> None:
        self._tok.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """'t5' = bundled SentencePiece; a `.model` file or a dir holding `spiece.model` (what
    `save` writes for T5) = SentencePiece; anything else goes to `AutoTokenizer`."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError(f"tokenizer={name_or_path!r} is not valid; accepted: 't5', an HF tokenizer name, or a path")
    if name_or_path == T5_NAME:
        return SentencePieceTokenizer(bundled_t5_path())
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.is_dir():
        # An HF save has tokenizer_config.json; prefer the plain SentencePiece reload when
        # there is none, or when it is the copy `SentencePieceTokenizer.save` derived.
        if (p / SPIECE).is_file() and (not (p / HF_CONFIG).is_file() or _derived(p / HF_CONFIG)):
            return SentencePieceTokenizer(p / SPIECE)
        return HFTokenizer(str(p))
    if p.suffix == ".model" or name_or_path.startswith((".", "/", "~")):
        raise ConfigError(f"tokenizer path {name_or_path!r} does not exist")
    return HFTokenizer(name_or_path)


def _derived(config_file: Path) -> bool:
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get(DERIVED_MARK) == SPIECE
    except (OSError, ValueError, AttributeError):
        return False


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fail early: an id >= vocab_size would otherwise crash deep inside the embedding lookup."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model vocab_size={model_vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"tokens ({tokenizer!r}); set the model's vocab_size >= {tokenizer.vocab_size}"
        )


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 of what decides the ids: the SentencePiece model file, or the HF tokenizer's full
    serialization (tokenizer.json) / vocabulary, plus the special ids. Equal across save/reload."""
    import hashlib
    import json

    h = hashlib.sha256()
    if isinstance(tokenizer, SentencePieceTokenizer):
        h.update(Path(tokenizer.model_file).read_bytes())
    elif isinstance(tokenizer, HFTokenizer):
        backend = getattr(tokenizer._tok, "backend_tokenizer", None)
        if backend is not None:
            # The parts that map text to ids (not padding/truncation settings, which a reload may change).
            full = json.loads(backend.to_str())
            h.update(json.dumps([full.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")],
                                sort_keys=True).encode())
        h.update(json.dumps(sorted(tokenizer._tok.get_vocab().items())).encode())
    else:  # any other Tokenizer: its vocabulary as decoded pieces
        h.update("\x00".join(tokenizer.decode([i]) for i in range(tokenizer.vocab_size)).encode())
    h.update(f"|{tokenizer.vocab_size}|{tokenizer.eos_id}|{tokenizer.pad_id}".encode())
    return h.hexdigest()
