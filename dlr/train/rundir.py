"""The run directory contract that dlr-eval, dlr-fold and dlr-compare rely on.

out_dir/config.yaml (resolved), metrics.jsonl, checkpoints/step_<N>/, final/, folded/
(method=dlr), summary.json. Only the main process writes here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError

# Keys that may change between a run and its resumption without making it another run.
RUNTIME_KEYS = {"resume", "dry_run", "plan_processes", "log_every", "eval_every", "save_every", "keep_last",
                "logger", "wandb", "micro_batch", "compile", "loss", "gradient_checkpointing", "parallelism"}
RUNTIME_DATA_KEYS = {"num_workers"}
# The reference layer's knobs (configs/train.yaml) with their defaults: a config.yaml written
# before they existed trained with exactly these.
KNOB_DEFAULTS = {"variance_correction": True, "trainable_alpha": False, "latent_alpha": None,
                 "trainable_latent_scale": False, "bias": False}


def upgrade_legacy_config(cfg: dict) -> dict:
    """A run config from before the knobs: their defaults, and its `random_reuse` is `permuted`.

    (`random_reuse` was the balanced permutation then; it now draws with replacement.) So an
    old run resumes with `expand=permuted` and dlr-compare groups it under the right name.
    """
    if not isinstance(cfg, dict) or "method" not in cfg or "variance_correction" in cfg:
        return cfg
    out = {**cfg, **KNOB_DEFAULTS}
    if out.get("expand") == "random_reuse":
        out["expand"] = "permuted"
    return out


def run_name(model: str, method: str, rank: int, alpha: float, seed: int, optimizer: str) -> str:
    """Deterministic (never a timestamp) so that every process and every resume agree."""
    parts = [model, method]
    if method != "full":
        parts.append(f"r{rank}")
    if method == "dlr":
        parts.append(f"a{alpha:g}")
    if optimizer != "adamw":
        parts.append(optimizer)
    parts.append(f"s{seed}")
    return "runs/" + "-".join(parts)


def _identity(cfg: dict) -> dict:
    ident = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    if isinstance(ident.get("data"), dict):
        ident["data"] = {k: v for k, v in ident["data"].items() if k not in RUNTIME_DATA_KEYS}
    return ident


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def check_run_dir(out_dir: Path, resolved: dict) -> None:
    """An existing out_dir from a different config is never silently overwritten."""
    saved = Path(out_dir) / "config.yaml"
    if not saved.exists():
        return
    previous = upgrade_legacy_config(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
    diff = _differences(_identity(previous), _identity(resolved))
    if diff:
        raise ConfigError(
            f"out_dir={str(out_dir)!r} holds a run with a different config (differs in: {', '.join(diff[:8])}); "
            "accepted: the same config (to resume) or another out_dir"
        )


def write_config(out_dir: Path, cfg: DictConfig) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(out_dir) / "config.yaml", resolve=True)


class MetricsLog:
    """Appends one JSON object per line; safe to reopen after a resume."""

    def __init__(self, path: Path, enabled: bool, start_step: int = 0) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled and start_step > 0 and self.path.exists():
            # Records past the checkpoint we resume from would be duplicated by the replay.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif enabled and start_step == 0 and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def write_summary(out_dir: Path, summary: dict) -> None:
    tmp = Path(out_dir) / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(Path(out_dir) / "summary.json")
