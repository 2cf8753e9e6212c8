"""`data=c4` (the hub path) end to end, offline, against a local mirror of the hub's C4 layout.

The hub is unreachable here. Our hub code globs the dataset repo through fsspec's `hf`
filesystem (huggingface_hub's HfFileSystem) and streams the matched `hf://` files through
`datasets`, which opens them with that same filesystem. The test registers a directory-backed
filesystem for `hf` instead (a mirror holding allenai/c4/en/ shards), so everything above it
runs for real: C4's shard globs, the hf:// paths, datasets' streaming, sharding and the
trainer. The check is that `data=c4` gives the same run as `data=c4_local` on the same files.
"""
import shutil
from importlib import resources
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dlr.data import data_spec
from dlr.data.sources import resolve_files
from dlr.train.loop import train
from test_data_helpers import mount_hub
from test_train import cfg, records

CONFIGS_DATA = Path(__file__).resolve().parents[1] / "configs" / "data"


@pytest.fixture
def hub_mirror(tmp_path, monkeypatch):
    """allenai/c4 with 2 of its 1024 train shards and 1 of its 8 validation shards."""
    en = tmp_path / "hub" / "datasets" / "allenai" / "c4" / "en"
    en.mkdir(parents=True)
    sample = resources.files("dlr.assets").joinpath("c4_sample")
    train_src = str(sample.joinpath("c4-train.00000-of-00001.json.gz"))
    for k in range(2):
        shutil.copyfile(train_src, en / f"c4-train.{k:05d}-of-01024.json.gz")
    shutil.copyfile(str(sample.joinpath("c4-validation.00000-of-00001.json.gz")), en / "c4-validation.00000-of-00008.json.gz")
    # A decoy that C4's train glob must not pick up.
    shutil.copyfile(train_src, en / "c4-train.00000-of-00002.json.gz")

    mount_hub(tmp_path / "hub", monkeypatch)
    return en


def test_hub_files_are_c4_shards_as_hf_urls(hub_mirror):
    spec = data_spec(OmegaConf.load(CONFIGS_DATA / "c4.yaml"))
    assert resolve_files(spec, "train") == [
        f"hf://datasets/allenai/c4/en/c4-train.{k:05d}-of-01024.json.gz" for k in range(2)
    ]
    assert resolve_files(spec, "validation") == ["hf://datasets/allenai/c4/en/c4-validation.00000-of-00008.json.gz"]


def test_data_c4_trains_like_the_same_files_read_locally(hub_mirror, tmp_path):
    common = ("steps=3", "method=dlr", "data.num_workers=0", "data.shuffle_buffer=64", "data.val_tokens=2000")
    hub = train(cfg(*common, "data=c4", f"out_dir={tmp_path / 'hub_run'}"))
    local = train(cfg(*common, "data=c4_local", f"out_dir={tmp_path / 'local_run'}",
                      f"data.train_files={hub_mirror}/c4-train.*-of-01024.json.gz",
                      f"data.validation_files={hub_mirror}/c4-validation.*-of-00008.json.gz"))
    assert records(tmp_path / "hub_run") == records(tmp_path / "local_run")
    assert hub["val_ppl"] == local["val_ppl"] and hub["val_tokens"] == local["val_tokens"] > 0
