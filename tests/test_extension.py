"""A factorization method and an optimizer declared in this file alone (no library file names
them) go through the public commands: dlr-train, the trainer's fold, dlr-fold, the reload and
dlr-eval. What docs/architecture.md's "add a method / an optimizer" rows promise."""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn

import dlr
from dlr.cli.evaluate import main as eval_cli
from dlr.cli.fold import main as fold_cli
from dlr.cli.train import main as train_cli
from dlr.config import METHODS, OPTIMIZERS, Method, from_overrides, method_named, register_method, run_name, setting
from dlr.data import load_tokenizer
from dlr.hf.lowrank import LowRankLinear
from dlr.model.llama import build_from_config
from dlr.artifacts.model_dir import load_model_dir, read_config
from dlr.optim import OptimizerSpec, build_optimizer, register_optimizer
from dlr.optim.build import BUILDERS
from dlr.train.setup import model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=llama_tiny", "data=c4_sample", "global_batch=8", "micro_batch=4", "data.val_tokens=2000",
        "data.num_workers=0", "eval_every=2", "save_every=2", "log_every=1"]
EVAL = ["data=c4_sample", "eval_tokens=2000", "batch_size=4", "progress=false"]


# ------------------------------------------------------------------ the method: its layer, its fold


def _up(layer: LowRankLinear) -> torch.Tensor:
    return getattr(layer.B, "weight", layer.B)  # B: a Parameter, or an nn.Linear's weight


class GatedLowRank(nn.Module):
    """y = B (g * act(A x)): a trainable gain per latent (starting at 1), folded into B's columns."""

    def __init__(self, inner: LowRankLinear) -> None:
        super().__init__()
        self.inner = inner
        self.gain = nn.Parameter(torch.ones(inner.rank, device=_up(inner).device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.inner.latent(x) * self.gain, self.inner.up_weight(), self.inner.bias)


def _swap(model: nn.Module, kind: type, make) -> int:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    for name, m in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(m))
    return len(found)


def build_gated(model: nn.Module) -> int:
    return _swap(model, LowRankLinear, GatedLowRank)


@torch.no_grad()
def fold_gated(model: nn.Module) -> int:
    def fold(m: GatedLowRank) -> LowRankLinear:
        _up(m.inner).mul_(m.gain)  # B diag(g): the plain low-rank layer it deploys as
        return m.inner

    return _swap(model, GatedLowRank, fold)


GATED = Method("gatedrank", "y = B (g * act(A x)), g a trainable gain per latent", knobs=("rank", "activation", "bias"),
               deploys_as="lowrank", run_name=("rank",), build=build_gated, fold=fold_gated)


# ------------------------------------------------------------------ the optimizer: its settings, its build


@dataclass
class SignSGDConfig:
    """signSGD: every parameter moves by lr * sign(grad)."""

    name: str = setting("signsgd", "the optimizer", choices=("signsgd",))


class SignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


SIGNSGD = OptimizerSpec(SignSGDConfig, lambda c, model, lr, fused: SignSGD(model.parameters(), lr=lr))


@pytest.fixture
def registered():
    """The two declarations, registered for one test and taken away after it."""
    register_method(GATED)
    register_optimizer(SIGNSGD)
    yield
    METHODS.pop(GATED.name)
    OPTIMIZERS.pop(SIGNSGD.name)
    BUILDERS.pop(SIGNSGD.name)


def train(monkeypatch, *args: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["dlr-train", *TINY, *args])
    train_cli()
    out = Path(next(a for a in args if a.startswith("out_dir=")).partition("=")[2])
    return json.loads((out / "summary.json").read_text())


def call(cli, args) -> int:
    with pytest.raises(SystemExit) as e:
        cli([str(a) for a in args])
    return e.value.code


def test_no_library_file_names_them():
    for path in [*(ROOT / "dlr").rglob("*.py"), *(ROOT / "configs").rglob("*.yaml")]:
        text = path.read_text()
        assert GATED.name not in text and SIGNSGD.name not in text, path


def test_a_method_declared_here_trains_folds_reloads_and_evaluates(registered, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    summary = train(monkeypatch, f"method={GATED.name}", "steps=2", f"out_dir={out}")
    assert run_name("llama_tiny", GATED.name, 16, 1.0, 0, "adamw") == f"runs/llama_tiny-{GATED.name}-r16-s0"
    # The trainer folds what dlr-fold folds: folded/ is the plain lowrank model, gains written into B.
    lowrank = dlr.model_stats(dlr.build_model("llama_tiny", "lowrank", device="meta"))
    assert summary["folded_layers"] == 14 and summary["deploy_params"] == lowrank.total_params
    assert summary["train_params"] == lowrank.total_params + 14 * 16
    assert abs(summary["folded_val_ppl"] - summary["val_ppl"]) / summary["val_ppl"] < 1e-5
    final, folded = load_model_dir(out / "final")[0], load_model_dir(out / "folded")[0]
    assert sum(isinstance(m, GatedLowRank) for m in final.modules()) == 14
    assert not any(isinstance(m, GatedLowRank) for m in folded.modules()) and read_config(out / "folded").dlr_folded
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, final(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # dlr-fold on final/ verifies the fold against the plain lowrank model's counts; dlr-eval reads both.
    assert call(fold_cli, [f"ckpt={out / 'final'}", f"out={tmp_path / 'refolded'}"]) == 0
    report = json.loads((tmp_path / "refolded" / "fold_report.json").read_text())
    assert report["passed"] and report["layers_folded"] == 14 and report["params"]["after"] == lowrank.total_params
    for ckpt, key in ((out / "final", "val_ppl"), (out / "folded", "folded_val_ppl")):
        capsys.readouterr()
        assert call(eval_cli, [f"ckpt={ckpt}", *EVAL, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["val_ppl"] == pytest.approx(summary[key], rel=1e-4)


def test_a_method_is_refused_until_registered(tmp_path, capsys):
    assert GATED.name not in METHODS
    with pytest.raises(dlr.ConfigError, match=f"method='{GATED.name}' is not valid; accepted: full, lowrank, dlr"):
        method_named(GATED.name)
    with pytest.raises(dlr.ConfigError, match="unknown setting"):
        Method("typo", "a typo'd knob", knobs=("rnak",))


def test_an_optimizer_declared_here_trains_through_dlr_train(registered, tmp_path, monkeypatch):
    args = ["method=lowrank", f"optimizer={SIGNSGD.name}", "lr=1e-3", "steps=2", f"out_dir={tmp_path / 'run'}"]
    set_seed(0)  # the trainer's initial weights (dlr.train.setup.build_state)
    init = build_from_config(model_config(from_overrides("train", [*TINY, *args]), load_tokenizer("t5"))).state_dict()
    summary = train(monkeypatch, *args)
    assert summary["optimizer"] == SIGNSGD.name and summary["steps"] == 2
    after = load_model_dir(tmp_path / "run" / "final")[0].state_dict()
    # signSGD: each weight moves by at most lr per step, and one with no gradient (the embedding
    # rows of tokens not in the batches) not at all; AdamW's weight decay would move those too.
    assert 0 < max(float((after[k] - v).abs().max()) for k, v in init.items()) <= 2e-3 * (1 + 1e-6)
    embed = "model.embed_tokens.weight"
    assert (after[embed] == init[embed]).all(dim=1).any()
    opt = build_optimizer({"name": SIGNSGD.name}, build_from_config(read_config(tmp_path / "run" / "final")),
                          "lowrank", lr=0.5)
    assert isinstance(opt, SignSGD) and opt.param_groups[0]["lr"] == 0.5
