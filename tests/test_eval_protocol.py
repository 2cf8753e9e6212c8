"""The evaluation protocols as library calls: the reports dlr-eval prints are the ones Python gets."""
import dataclasses
import inspect
import json

import pytest
import yaml
from importlib import resources

import dlr.eval
from dlr.cli.evaluate import main as eval_cli
from dlr.data import Format, data_spec, datasets_batches, validation_batches
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


# A kind of file declared in this test alone (no dlr file names it): running text in .md files.
NOTES = Format("Markdown notes", (".md",), datasets_batches("text", sample_by=lambda s: "document"),
               check=lambda spec, path: None, field=lambda spec: "text", whole_file_documents=True,
               described_by=("text_field",))


def test_a_declared_source_is_evaluated_by_what_it_declares(model_dir, wiki, tmp_path):
    """dlr/eval asks the source's declaration, so a new source needs no edit there."""
    notes = tmp_path / "notes.md"
    notes.write_text(wiki.read_text(encoding="utf-8"), encoding="utf-8")
    spec = data_spec({"source": f"{__name__}:NOTES", "validation_files": str(tmp_path / "*.md"), "val_tokens": None})
    assert resolve_protocol("auto", spec) == "sliding"
    model, tok = load_model_dir(model_dir)
    rep = sliding_perplexity(model, tok, spec, stride=200, batch_size=8)
    assert rep.tokens == rep.corpus.corpus_tokens == len(tok.encode_batch([notes.read_text(encoding="utf-8")])[0])
    assert rep.data["text_field"] == "text" and rep.data["validation_files"] == [str(notes)]
    with pytest.raises(ConfigError, match="protocol=rows .* would score 255 of the corpus's"):  # a corpus: scored whole
        rows_perplexity(model, tok, spec, batch_size=8)
    rows = rows_perplexity(model, tok, spec, batch_size=8, min_coverage=0.0)
    assert rows.data["validation_files"] == [str(notes)]  # the glob, resolved


def test_sliding_is_refused_where_the_source_says_why(tmp_path):
    mix = data_spec({"source": "mix", "mix": [{"config": "c4_sample", "weight": 1}]})
    with pytest.raises(ConfigError, match="data.source='mix' weighs its sources by rows; accepted there: protocol=rows"):
        resolve_protocol("sliding", mix)
    assert resolve_protocol("auto", mix) == "rows"


def test_every_declared_source_has_a_kind():
    from dlr.config.choices import SOURCES
    from dlr.data.formats import FORMATS, OTHER_SOURCES

    assert set(SOURCES) == set(FORMATS) | set(OTHER_SOURCES) and not set(FORMATS) & set(OTHER_SOURCES)


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
