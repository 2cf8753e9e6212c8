"""A data source is one declared object: a new kind of file, declared in this test file alone
(no dlr file names it), trains, prepares token shards and is evaluated on through the public
commands, selected by `data.source=<module>:<NAME>`."""
from __future__ import annotations

import csv
import gzip
import json
from importlib import resources

import test_data_helpers  # noqa: F401  (sets HF offline env first)

import pytest

from dlr.data import Format, data_spec, datasets_batches, load_tokenizer
from dlr.errors import ConfigError


def _check_csv(spec, path: str) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if "body" not in header:
        raise ConfigError(f"{path!r}: no 'body' column (columns: {', '.join(header)})")


# The whole declaration: CSV files whose documents are in a `body` column, read by `datasets`.
TOY = Format("CSV", (".csv",), datasets_batches("csv"), _check_csv, field=lambda spec: "body")
SOURCE = f"{__name__}:TOY"


def _write_csv(path, split: str, n: int):
    src = str(resources.files("dlr.assets").joinpath("c4_sample", f"c4-{split}.00000-of-00001.json.gz"))
    with gzip.open(src, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:n]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerows([i, t] for i, t in enumerate(texts))
    return texts


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    train = _write_csv(d / "train.csv", "train", 300)
    val = _write_csv(d / "val.csv", "validation", 60)
    return d, train, val


def overrides(d):
    return ["data=c4_local", f"data.source={SOURCE}", f"data.train_files={d / 'train.csv'}",
            f"data.validation_files={d / 'val.csv'}"]


def test_a_declared_source_trains_prepares_and_evaluates(toy, tmp_path, capsys):
    from test_train import cfg

    from dlr.cli.evaluate import main as eval_main
    from dlr.cli.prepare import main as prepare_main
    from dlr.train.loop import train

    d, train_texts, val_texts = toy
    out = tmp_path / "run"
    summary = train(cfg(*overrides(d), "data.val_tokens=2000", "steps=2", "method=lowrank", f"out_dir={out}"))
    assert summary["val_tokens"] > 0 and list(summary["data_tokens"]) == [str(d / "train.csv")]
    assert 0 < summary["data_tokens"][str(d / "train.csv")] <= 2 * 8 * 256  # 2 steps of 8 rows of 256

    shards = tmp_path / "shards"
    with pytest.raises(SystemExit) as e:
        prepare_main([*overrides(d), f"out={shards}"])
    assert e.value.code in (0, None)
    manifest = json.loads((shards / "manifest.json").read_text())
    tok = load_tokenizer("t5")
    assert manifest["splits"]["train"]["documents"] == len(train_texts)
    assert manifest["splits"]["train"]["tokens"] == sum(len(x) for x in tok.encode_batch(train_texts))

    res = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as e:
        eval_main(["ckpt=" + str(out / "final"), *overrides(d), "eval_tokens=2000", "batch_size=4", "progress=false",
                   f"out={res}"])
    assert e.value.code in (0, None)
    result = json.loads(res.read_text())
    assert result["tokens"] == 1989 == summary["val_tokens"] and result["data"]["source"] == SOURCE


def test_a_declared_source_checks_its_files_in_one_line(toy, tmp_path):
    d, _, _ = toy
    bad = tmp_path / "bad.csv"
    bad.write_text("id,content\n1,x\n")
    from dlr.data import train_batches

    with pytest.raises(ConfigError, match="no 'body' column"):
        train_batches(data_spec({"source": SOURCE, "train_files": str(bad)}), load_tokenizer("t5"), 2, 0, 1, 0)
    with pytest.raises(ConfigError, match="cannot import it"):
        train_batches(data_spec({"source": "no_such_module:TOY", "train_files": str(bad)}), load_tokenizer("t5"), 2, 0,
                      1, 0)
