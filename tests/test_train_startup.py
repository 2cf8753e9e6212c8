"""dlr-train's start-up does each thing once: the settings are composed and validated once, the
model and the optimizer are built once, the resume value and the checkpoint resumed from are
checked once; for a fresh run and for a resumed one.

Counted on real tiny runs through the command line (in-process): each counted function is the
real one, wrapped wherever dlr's modules hold it, and counting stops when the training loop starts.
"""
import functools
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch
from hydra._internal.config_loader_impl import ConfigLoaderImpl

import dlr.config.overrides
import dlr.model.llama
import dlr.train.checkpoint_files
import dlr.train.loop
import dlr.train.preflight
from dlr.cli import train as train_cli

TINY = ["model=llama_tiny", "data=c4_sample", "global_batch=4", "micro_batch=4", "data.val_tokens=1000",
        "data.num_workers=0", "eval_every=2", "save_every=2", "keep_last=5", "steps=4", "method=dlr"]

COUNTED = {"validate": (dlr.config.overrides, "typed"),
           "build_model": (dlr.model.llama, "build_from_config"),
           "check_resume": (dlr.train.preflight, "check_resume"),
           "check_checkpoint": (dlr.train.checkpoint_files, "check_checkpoint")}


def count_startup(monkeypatch) -> Counter:
    """Calls of each COUNTED function, of Hydra's config composition (the compose API's and
    @hydra.main's) and of torch's AdamW constructor (the optimizer build), made before the first
    training step."""
    calls, looping = Counter(), []

    def counting(name, real):
        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            if not looping:
                calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name, (module, attr) in COUNTED.items():
        real = getattr(module, attr)
        wrapped = counting(name, real)
        for mod in [m for n, m in sys.modules.items() if n == "dlr" or n.startswith("dlr.")]:
            if vars(mod).get(attr) is real:  # its home and every module that imported it by name
                monkeypatch.setattr(mod, attr, wrapped)
    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counting("compose", ConfigLoaderImpl.load_configuration))
    monkeypatch.setattr(torch.optim.AdamW, "__init__", counting("build_optimizer", torch.optim.AdamW.__init__))
    real_loop = dlr.train.loop._loop

    def loop(*args, **kwargs):
        looping.append(True)
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(dlr.train.loop, "_loop", loop)
    return calls


def dlr_train(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["dlr-train", *TINY, *args])
    train_cli.main()


def test_a_fresh_run_composes_validates_builds_and_checks_each_thing_once(tmp_path, monkeypatch):
    calls = count_startup(monkeypatch)
    dlr_train(monkeypatch, f"out_dir={tmp_path / 'run'}")
    assert (tmp_path / "run" / "summary.json").is_file()
    assert dict(calls) == {"compose": 1, "validate": 1, "build_model": 1, "build_optimizer": 1, "check_resume": 1}


def test_a_resumed_run_checks_its_checkpoint_once_and_builds_once(tmp_path, monkeypatch):
    out = tmp_path / "run"
    dlr_train(monkeypatch, f"out_dir={out}")
    for name in ("checkpoints/step_4", "final", "folded", "summary.json"):  # as if killed after step 2
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    calls = count_startup(monkeypatch)
    dlr_train(monkeypatch, f"out_dir={out}", f"resume={out / 'checkpoints' / 'step_2'}")
    assert (out / "summary.json").is_file() and (out / "checkpoints" / "step_4").is_dir()
    assert dict(calls) == {"compose": 1, "validate": 1, "build_model": 1, "build_optimizer": 1, "check_resume": 1,
                           "check_checkpoint": 1}


def test_the_counting_sees_what_it_counts(tmp_path, monkeypatch):
    """The wrappers count calls made anywhere in dlr: a second build is seen."""
    calls = count_startup(monkeypatch)
    config = dlr.model.llama.make_config("llama_tiny", dlr.model.llama.factorization("dlr"))
    dlr.model.llama.build_from_config(config, device="meta")
    dlr.train.setup.build_from_config(config, device="meta")
    assert calls["build_model"] == 2
