"""The evaluation protocols as library calls: the reports dlr-eval prints are the ones Python gets."""
import dataclasses
import inspect
import json

import pytest
import yaml
from importlib import resources

import dlr.eval
from dlr.cli.evaluate import main as eval_cli
from dlr.data import data_spec, validation_batches
from dlr.errors import ConfigError
from dlr.eval import EvalReport, evaluate, evaluate_checkpoint, resolve_protocol, rows_perplexity, sliding_perplexity
from dlr.artifacts.model_dir import load_model_dir
from dlr.config import EvalConfig
from test_cli_eval_fold import EVAL, call, run  # noqa: F401  (the module-scoped tiny final/ + folded/ fixture)
from test_eval_corpus import model_dir, wiki  # noqa: F401


def sample(val_tokens=None):
    raw = yaml.safe_load(resources.files("dlr.configs").joinpath("data", "c4_sample.yaml").read_text())
    return dataclasses.replace(data_spec(raw), val_tokens=val_tokens)


def test_evaluate_checkpoint_is_what_dlr_eval_reports(run, capsys):
    report = evaluate_checkpoint(run / "final", data=sample(2000), batch_size=4)
    assert isinstance(report, EvalReport) and report.perplexity.protocol == "rows" and report.tasks is None
    code, out, err = call(eval_cli, [f"ckpt={run / 'final'}", *EVAL, "--json"], capsys)
    assert code == 0, err
    cli = json.loads(out)
    mine = report.to_dict()
    assert set(mine) == set(cli) and mine["seconds"] >= 0
    assert {k: v for k, v in mine.items() if k != "seconds"} == {k: v for k, v in cli.items() if k != "seconds"}


def test_rows_perplexity_is_the_trainers_eval(run):
    model, tok = load_model_dir(run / "final")
    spec = sample(2000)
    rep = rows_perplexity(model, tok, spec, batch_size=4)
    ref = evaluate(model, validation_batches(spec, tok, 4), "cpu")
    assert (rep.val_loss, rep.val_ppl, rep.tokens) == (ref["val_loss"], ref["val_ppl"], ref["val_tokens"])
    assert rep.corpus is None and set(rep.to_dict()) == {"val_ppl", "val_loss", "tokens", "protocol", "data"}


def test_sliding_perplexity_scores_the_whole_corpus(model_dir, wiki):
    spec = data_spec({"source": "text", "validation_files": str(wiki), "val_tokens": None})
    model, tok = load_model_dir(model_dir)
    rep = sliding_perplexity(model, tok, spec, stride=200, batch_size=8)
    n = len(tok.encode_batch([wiki.read_text(encoding="utf-8")])[0])
    assert (rep.protocol, rep.window, rep.stride) == ("sliding", 256, 200)
    assert rep.tokens == rep.corpus.scored_tokens == rep.corpus.corpus_tokens == n
    assert rep.corpus.word_ppl is not None and rep.to_dict()["bits_per_byte"] == rep.corpus.bits_per_byte
    with pytest.raises(ConfigError, match="would score 100 of the corpus's"):
        sliding_perplexity(model, tok, dataclasses.replace(spec, val_tokens=100), batch_size=8)


def test_the_protocol_is_chosen_by_the_data(wiki, tmp_path):
    text = data_spec({"source": "text", "validation_files": str(wiki)})
    assert resolve_protocol("auto", text) == "sliding" and resolve_protocol("auto", sample()) == "rows"
    assert resolve_protocol("rows", text) == "rows"
    with pytest.raises(ConfigError, match="stride=256 is not valid"):
        resolve_protocol("sliding", text, stride=256)
    with pytest.raises(ConfigError, match="protocol='chunks' is not valid; accepted: auto, sliding, rows"):
        resolve_protocol("chunks", text)


def test_bad_input_is_refused_before_the_weights_are_read(run, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_checkpoint(tmp_path / "nope", data=sample())
    with pytest.raises(ConfigError, match="dtype='fp16' is not valid"):
        evaluate_checkpoint(run / "final", data=sample(), dtype="fp16")
    with pytest.raises(ConfigError, match="unknown lm-evaluation-harness task 'c4_clozee'; did you mean c4_cloze"):
        evaluate_checkpoint(run / "final", tasks="c4_clozee")


def test_library_defaults_are_the_settings_defaults():
    """One default per setting: the keyword defaults of the library equal dlr-eval's."""
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    shared = {evaluate_checkpoint: ("protocol", "stride", "tasks", "batch_size", "device", "dtype", "verify",
                                    "min_coverage"),
              rows_perplexity: ("batch_size", "min_coverage"), sliding_perplexity: ("stride", "batch_size", "min_coverage")}
    for fn, names in shared.items():
        params = inspect.signature(fn).parameters
        for name in names:
            assert params[name].default == defaults[name], (fn.__name__, name)
    assert set(dlr.eval.__all__) >= {"evaluate_checkpoint", "rows_perplexity", "sliding_perplexity", "EvalReport"}
