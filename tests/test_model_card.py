"""final/ and folded/ carry a Hugging Face model card (README.md) and publish as they are."""
import pytest
import torch
from huggingface_hub import CommitOperationAdd, ModelCard, metadata_load
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS  # what upload_folder adds to ignore_patterns
from huggingface_hub.utils import filter_repo_objects

import dlr
from dlr.cli.fold import main as fold_cli
from dlr.data import load_tokenizer
from dlr.artifacts.model_card import SERVER
from dlr.artifacts.model_dir import read_meta, save_model_dir

EXTRA = {"step": 6, "tokens": 24576, "val_loss": 7.25, "val_tokens": 4096, "data": "c4_sample", "dataset": "allenai/c4"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", "dlr", rank=8, alpha=0.5, expand="random_reuse")
    save_model_dir(model, load_tokenizer("t5"), root / "final", extra=EXTRA)
    with pytest.raises(SystemExit) as e:
        fold_cli([f"ckpt={root / 'final'}"])
    assert e.value.code == 0
    return root / "final", root / "folded"


@pytest.mark.parametrize("which", [0, 1], ids=["final", "folded"])
def test_the_card_has_the_hub_metadata_and_describes_the_model(dirs, which):
    d = dirs[which]
    card = ModelCard.load(d / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and meta["datasets"] == ["allenai/c4"]
    assert {"dlr", "low-rank", "llama"} <= set(meta["tags"])
    assert metadata_load(d / "README.md") == meta
    text = card.text
    for needle in ("| rank | `8` |", "| alpha | `0.5` |", "| expand | `random_reuse` |", "`data=c4_sample`",
                   "allenai/c4", "24,576", "Validation perplexity on 4,096 held-out tokens: **1408.10**",
                   "import dlr.hf", "trust_remote_code=False", "revision=", SERVER):
        assert needle in text, needle
    if which == 1:
        assert "folded" in meta["tags"] and "| folded | `True` |" in text
        check = read_meta(d)["extra"]
        assert check["folded_from"] == "final" and check["unfolded_val_loss"] == 7.25
        assert "Fold check (dlr-fold" in text and "passed: True" in text


def test_the_directory_is_what_upload_folder_publishes_as_is(dirs):
    for d in dirs:
        files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
        # upload_folder's own filter keeps every file: no temporaries, no hidden or cache files.
        assert list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS)) == files
        assert "README.md" in files and "model.safetensors" in files
        for f in files:
            CommitOperationAdd(path_or_fileobj=d / f, path_in_repo=f)  # validates each path as the Hub would
