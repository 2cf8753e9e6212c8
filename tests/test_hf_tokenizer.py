"""The Hugging Face tokenizer path, offline: a real tokenizer directory built from the C4 sample.

`data.tokenizer=<dir>` must drive the whole pipeline: the model's vocab and its pad/eos ids
come from that tokenizer, the checkpoint carries it, and dlr-eval reads it back.
"""
import gzip
import json
from importlib import resources

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dlr.artifacts.model_dir import load_model_dir
from dlr.cli.evaluate import main as eval_cli
from dlr.data import load_tokenizer
from dlr.data.tokenizer import HFTokenizer
from dlr.train.loop import train
from test_cli_eval_fold import call
from test_train import cfg

SPECIALS = ["<pad>", "</s>", "<unk>"]


def c4_texts(n: int) -> list[str]:
    path = resources.files("dlr.assets").joinpath("c4_sample", "c4-train.00000-of-00001.json.gz")
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 600) trained on 300 C4 documents, saved as HF does."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(c4_texts(300), trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("hf_tok")
    wrapped.save_pretrained(str(out))
    return out


def test_a_local_hf_tokenizer_dir_loads_as_hf(hf_tokenizer_dir):
    tok = load_tokenizer(str(hf_tokenizer_dir))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (600, SPECIALS.index("<pad>"), SPECIALS.index("</s>"))
    text = c4_texts(1)[0][:200]
    ids = tok.encode_batch([text])[0]
    assert tok.eos_id not in ids  # special tokens are appended by the batching code, not here
    assert tok.decode(ids) == text


def test_training_with_an_hf_tokenizer_end_to_end(hf_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(cfg("steps=2", f"out_dir={out}", "method=dlr", f"data.tokenizer={hf_tokenizer_dir}",
                        "data.val_tokens=1000"))
    model, tok = load_model_dir(out / "folded")
    assert isinstance(tok, HFTokenizer)
    # The model is sized and labelled by this tokenizer, not by the T5 default.
    assert model.config.vocab_size == 600
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_id, tok.eos_id)
    assert tok.encode_batch(["held-out text"]) == load_tokenizer(str(hf_tokenizer_dir)).encode_batch(["held-out text"])
    code, _, err = call(eval_cli, [f"ckpt={out / 'folded'}", "data=c4_sample", "eval_tokens=1000", "batch_size=2",
                                   f"out={tmp_path / 'eval.json'}"], capsys)
    assert code == 0, err
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    # Same tokenizer, same validation documents: dlr-eval reproduces the trainer's folded eval.
    assert evaluated["val_ppl"] == pytest.approx(summary["folded_val_ppl"], rel=1e-5)
