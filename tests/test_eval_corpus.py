"""Corpus perplexity done right (dlr-eval data=text): every token scored once, by a sliding window.

The corpus is laid out as WikiText's raw files are: headings, and blank lines holding one
space, so the whole file is one "paragraph" and the row protocol would score 255 tokens.
"""
import gzip
import json
import math
import re
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

import dlr
from dlr.artifacts.model_dir import load_model_dir, save_model_dir
from dlr.cli.evaluate import main as eval_cli
from dlr.eval.corpus import window_spans
from dlr.data import load_tokenizer
from dlr.errors import ConfigError
from test_cli_eval_fold import call

EVAL = ["data=text", "batch_size=8", "progress=false"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method="dlr", seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_model_dir(model, load_tokenizer("t5"), tmp_path_factory.mktemp("ppl") / "final")


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    path = resources.files("dlr.assets").joinpath("c4_sample", "c4-validation.00000-of-00001.json.gz")
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(12), f)]
    text = "".join(f" = Article {i} = \n \n" + "".join(f" {p} \n \n" for p in d.split("\n")) for i, d in enumerate(docs))
    out = tmp_path_factory.mktemp("wiki") / "test.txt"
    out.write_text(text, encoding="utf-8")
    return out


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 3), (11, 4, 2), (100, 16, 5), (7, 32, 16), (33, 8, 1), (1, 4, 2)])
def test_windows_score_every_position_once_with_enough_context(n, window, stride):
    scored = []
    for begin, end, first in window_spans(n, window, stride):
        assert 0 <= begin < first < end <= n and end - begin <= window
        if begin > 0:  # past the first window, every scored token sees >= window - stride tokens
            assert first - begin >= window - stride
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_window_and_stride_are_checked():
    with pytest.raises(ConfigError, match="stride=4 is not valid; accepted: 1 <= stride < window"):
        window_spans(10, 4, 4)
    with pytest.raises(ConfigError, match="window=1"):
        window_spans(10, 1, 1)


def test_text_corpus_counts_every_token_and_names_its_files(model_dir, wiki, tmp_path, capsys):
    code, out, err = call(eval_cli, [f"ckpt={model_dir}", *EVAL, f"data.validation_files={wiki}",
                                     f"out={tmp_path / 'e.json'}"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    text = wiki.read_text(encoding="utf-8")
    n = len(load_tokenizer("t5").encode_batch([text])[0])
    assert res["protocol"] == "sliding" and (res["window"], res["stride"]) == (256, 128)
    assert res["tokens"] == res["scored_tokens"] == res["corpus_tokens"] == n > 2000
    assert res["data"]["source"] == "text" and res["data"]["validation_files"] == [str(wiki)]
    assert "allenai/c4" not in json.dumps(res)
    assert res["words"] == len(text.split()) and res["bytes"] == len(text.encode())
    nll = res["val_loss"] * n
    assert res["word_ppl"] == pytest.approx(math.exp(nll / res["words"]))
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / res["bytes"])
    assert res["val_ppl"] == pytest.approx(math.exp(res["val_loss"])) and "word_ppl=" in out


def test_one_window_over_the_whole_corpus_is_one_plain_forward(model_dir, tmp_path, capsys):
    corpus = tmp_path / "short.txt"
    corpus.write_text(" = Heading = \n \n A short corpus of a few sentences. It has two paragraphs. \n \n The end. \n")
    code, _, err = call(eval_cli, [f"ckpt={model_dir}", *EVAL, f"data.validation_files={corpus}", "data.seq_len=64",
                                   "stride=7", f"out={tmp_path / 'e.json'}"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    model, tok = load_model_dir(model_dir)
    ids = torch.tensor([[tok.eos_id] + tok.encode_batch([corpus.read_text()])[0]])
    assert ids.shape[1] <= 64  # one window: the stride does not matter
    with torch.no_grad():
        want = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]).item()
    assert res["tokens"] == ids.shape[1] - 1
    assert res["val_loss"] == pytest.approx(want, rel=1e-5)


def test_the_stride_only_changes_context_not_the_count(model_dir, wiki, tmp_path, capsys):
    res = {}
    for stride in (255, 64):
        code, _, err = call(eval_cli, [f"ckpt={model_dir}", *EVAL, f"data.validation_files={wiki}", f"stride={stride}",
                                       f"out={tmp_path / f'{stride}.json'}"], capsys)
        assert code == 0, err
        res[stride] = json.loads((tmp_path / f"{stride}.json").read_text())
    assert res[255]["tokens"] == res[64]["tokens"]
    assert res[255]["val_loss"] != res[64]["val_loss"]


@pytest.mark.parametrize("extra,needle", [
    (["protocol=rows"], r"protocol=rows \(data.mode=paper, sample_by=paragraph\) would score 255 of the corpus's"),
    (["protocol=rows", "data.sample_by=line"], r"protocol=rows \(data.mode=paper, sample_by=line\) would score"),
    (["eval_tokens=1000"], r"eval_tokens=1000 \(data.val_tokens\) would score 1,000 of the corpus's .* set eval_tokens >="),
    (["stride=256"], r"stride=256 is not valid"),
    (["protocol=chunks"], r"protocol='chunks' is not valid; accepted: auto, sliding, rows"),
    (["min_coverage=2"], r"min_coverage=2.0 is not valid"),
])
def test_partial_or_bad_corpus_evaluations_are_errors(model_dir, wiki, tmp_path, capsys, extra, needle):
    code, _, err = call(eval_cli, [f"ckpt={model_dir}", *EVAL, f"data.validation_files={wiki}", *extra,
                                   f"out={tmp_path / 'e.json'}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(needle, err), err
    assert not (tmp_path / "e.json").exists()


def test_rows_protocol_on_text_passes_when_packed_covers_the_corpus(model_dir, wiki, tmp_path, capsys):
    code, out, err = call(eval_cli, [f"ckpt={model_dir}", *EVAL, f"data.validation_files={wiki}", "protocol=rows",
                                     "data.mode=packed", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["protocol"] == "rows" and res["data"]["mode"] == "packed" and res["tokens"] > 2000
