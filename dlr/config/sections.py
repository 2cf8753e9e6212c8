"""The sections of a training run's configuration: each setting declared once, typed, with
its default, what it accepts and what it means.

A section is a plain dataclass; `dlr.config.from_overrides` builds a `TrainConfig` of them from
the command line, and the rest of dlr reads attributes (`cfg.factorization.rank`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Optional

from .choices import (ACTIVATIONS, EXHAUSTED, EXPAND_MODES, LOGGERS, LOSS_IMPLS, METHODS, MODES, NS_DTYPES, OPTIMIZERS,
                      PARALLELISMS, PRECISIONS, SAMPLE_BY, SCOPES, SOURCES)
from .fields import is_number, section, setting

# Far above any recipe; what keeps lr / (1 - beta) (AdamW's first steps) inside float32.
MAX_LR = 1e30


def _betas(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v)
    return None if ok else "a list of 2 numbers in [0, 1), e.g. [0.9,0.95]"


def _files(v: Any) -> str | None:
    if v is None or isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v)):
        return None
    return "a path, a glob, or a list of them"


def _source(v: Any) -> str | None:
    if v in SOURCES or (isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v)):
        return None
    return f"{', '.join(SOURCES)}, or module:NAME of a dlr.data.Format"


def _mix(v: Any) -> str | None:
    ok = v is None or (isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(e, Mapping) and is_number(e.get("weight")) and e.get("weight") >= 0 for e in v))
    return None if ok else ("a list of sources, each a mapping with a weight >= 0 and the data keys of that source, "
                            "e.g. [{config: c4_sample, weight: 0.7}, {config: fineweb_edu, weight: 0.3}]")


def _compile(v: Any) -> str | None:
    return None if v in ("auto", True, False) and not (isinstance(v, int) and not isinstance(v, bool)) else "auto, true, false"


@dataclass
class ModelConfig:
    """configs/model/<name>.yaml: a LLaMA size. The same file sets the size's recipe as the schedule's
    defaults (steps, lr, global_batch, micro_batch), so each recipe value has one key."""

    name: str = setting(MISSING, "the size's name (llama_tiny ... llama_7b)", nonempty=True)
    hidden_size: int = setting(MISSING, "model width d", gt=0)
    intermediate_size: int = setting(MISSING, "MLP width", gt=0)
    num_attention_heads: int = setting(MISSING, "attention heads (hidden_size must divide by it)", gt=0)
    num_hidden_layers: int = setting(MISSING, "transformer blocks", gt=0)
    max_position_embeddings: int = setting(1024, "longest sequence the rotary tables cover", gt=0)
    default_rank: int = setting(MISSING, "rank used when rank= is not given", gt=0)


@dataclass
class FactorizationConfig:
    """What each projection is: y = c (B + s R) act(A x) + b (docs/models.md)."""

    method: str = setting("dlr", "full (dense) | lowrank (y = B act(A x)) | dlr (lowrank + the DLR residual)",
                          choices=METHODS)
    rank: Optional[int] = setting("${model.default_rank}", "rank r of every factorized projection", gt=0)
    alpha: float = setting(1.0, "DLR residual scale: alpha / sqrt(K) (or alpha, see variance_correction)", ge=0)
    activation: str = setting("silu", "silu (CoLA) | identity (plain W = BA) | gelu | relu", choices=ACTIVATIONS)
    expand: str = setting("uniform", "uniform (output o reads latent o // K) | random_reuse (the reference's index: "
                                     "drawn with replacement, seeded per layer) | permuted (uniform index shuffled)",
                          choices=EXPAND_MODES)
    scope: str = setting("all", "which projections carry the DLR residual", choices=SCOPES)
    variance_correction: bool = setting(True, "residual scale alpha / sqrt(K); false: plain alpha")
    trainable_alpha: bool = setting(False, "alpha is one trainable scalar per DLR layer (folded with its learned value)")
    latent_alpha: Optional[float] = setting(None, "fixed latent scale latent_alpha / rank on act(A x) (lowrank and dlr); "
                                                  "null = none", gt=0)
    trainable_latent_scale: bool = setting(False, "latent scale tanh(p), p a trainable scalar per layer starting at 1 "
                                                  "(excludes latent_alpha)")
    bias: bool = setting(False, "output bias on every projection (LLaMA has none)")


@dataclass
class DataConfig:
    """configs/data/<name>.yaml; `dlr.data.data_spec` turns it into a DataSpec."""

    source: str = setting("hub", "hub (HF hub streaming: Parquet, JSON lines or text, by file extension) | json "
                                 "(JSON-lines files, plain, .gz or .zst) | parquet | text (plain text files) | "
                                 "tokens (dlr-prepare shards) | mix (the weighted sources of data.mix) | module:NAME "
                                 "(a dlr.data.Format declared in your own code)", check=_source)
    path: Optional[str] = setting("allenai/c4", "source=hub: the dataset id; source=tokens: the directory dlr-prepare "
                                                "wrote (token shards + manifest.json)")
    name: Optional[str] = setting("en", "hub dataset config name (source=hub only)")
    train_files: Any = setting(None, "train split: a path, a directory, a glob or a list of them; for the hub, "
                                     "globs inside the dataset repo; pkg://dlr.assets/... = bundled files", check=_files)
    validation_files: Any = setting(None, "validation split, same forms as train_files", check=_files)
    text_field: str = setting("text", "JSON field holding the document text", nonempty=True)
    sample_by: str = setting("paragraph", "source=text: one document per blank-line-separated block | per line",
                             choices=SAMPLE_BY)
    tokenizer: Optional[str] = setting("t5", "bundled T5 SentencePiece (32000 pieces), an HF name or a local path; "
                                             "source=tokens: null = the tokenizer saved with the shards", nonempty=True)
    seq_len: int = setting(256, "tokens per training / validation row", ge=2)
    mode: str = setting("paper", "paper (truncate/pad each document) | packed (EOS-joined windows)", choices=MODES)
    shuffle_buffer: int = setting(10_000, "documents shuffled in blocks of this many; 0 = no shuffling", ge=0)
    num_workers: int = setting(2, "DataLoader worker processes for the train stream (0 = in process)", ge=0,
                               runtime=True)
    val_tokens: Optional[int] = setting(10_000_000, "validation budget: the first N tokens; null = whole split", ge=1)
    prefetch: int = setting(4, "source=tokens: batches built ahead in a background thread (0 = in the training step)",
                            ge=0)
    holdout: Optional[int] = setting(None, "validation where the corpus has none: the first N documents of the train "
                                           "split (sorted files, file order) are the validation split and training "
                                           "never sees them; null = data.validation_files", ge=1)
    mix: Any = setting(None, "source=mix: the sources and their weights, [{config: <data config>, weight: w, "
                             "<data keys of that source>}, ...]", check=_mix)
    exhausted: str = setting("cycle", "a mixture source that has handed out all its documents: cycle (its next "
                                      "epoch, in a new order) | stop (the run ends with one line)", choices=EXHAUSTED)


@dataclass
class AdamWConfig:
    """configs/optimizer/adamw.yaml: torch AdamW, weight decay on 2-D weights only."""

    name: str = setting("adamw", "the optimizer", choices=("adamw",))
    weight_decay: float = setting(0.01, "decoupled weight decay on 2-D weights", ge=0)
    betas: list[float] = setting([0.9, 0.999], "Adam moment decay rates", check=_betas)
    eps: float = setting(1e-8, "Adam denominator epsilon", gt=0)


@dataclass
class SpectronConfig:
    """configs/optimizer/spectron.yaml: Spectron on A/B factor pairs, AdamW on the rest (docs/spectron.md)."""

    name: str = setting("spectron", "the optimizer", choices=("spectron",))
    weight_decay: float = setting(0.01, "decoupled, lr * weight_decay, on factors and 2-D AdamW weights", ge=0)
    momentum: float = setting(0.9, "M <- momentum * M + (1 - momentum) * grad", ge=0, lt=1)
    ns_steps: int = setting(5, "Newton-Schulz iterations per orthogonalization", ge=1)
    power_init_iters: int = setting(10, "power iterations on the first step only; then 1 per step", ge=1)
    ns_dtype: str = setting("float32", "Newton-Schulz dtype (bfloat16 only takes effect on CUDA)", choices=NS_DTYPES)
    seed: int = setting(0, "seeds the power-iteration start vectors (same on every rank)")
    adamw_lr: Optional[float] = setting(None, "AdamW part (embeddings, lm_head, norms); null = lr (the schedule's, "
                                              "which Spectron reads as its factor step: each factor moves by "
                                              "lr / (||A||_2 + ||B||_2 + 1))", gt=0, le=MAX_LR)
    adamw_weight_decay: Optional[float] = setting(None, "AdamW part; null = weight_decay", ge=0)
    betas: list[float] = setting([0.9, 0.999], "AdamW part: moment decay rates", check=_betas)
    eps: float = setting(1e-8, "AdamW part: epsilon", gt=0)


OPTIMIZERS.update(adamw=AdamWConfig, spectron=SpectronConfig)
OPTIMIZER_SCHEMAS = OPTIMIZERS


@dataclass
class ScheduleConfig:
    """How long, how fast and in what batches: the learning-rate schedule and the batch geometry.

    configs/model/<name>.yaml sets steps, lr, global_batch and micro_batch to the size's recipe."""

    steps: int = setting(MISSING, "optimizer steps (ignored when tokens is set); default: the size's recipe", gt=0)
    tokens: Optional[float] = setting(None, "token budget; sets steps = ceil(tokens / tokens per step)", gt=0)
    lr: float = setting(MISSING, "peak learning rate of the optimizer (Spectron: its factor step); default: the "
                                 "size's recipe", gt=0, le=MAX_LR)
    global_batch: int = setting(512, "sequences per optimizer step, over all processes; default: the size's recipe",
                                gt=0)
    micro_batch: int = setting(MISSING, "sequences per process per forward (accumulation is derived); default: the "
                                        "size's recipe", gt=0, runtime=True)
    warmup: float = setting(0.1, "linear warmup from 0, as a fraction of steps", ge=0, lt=1)
    min_lr_ratio: float = setting(0.1, "cosine decays to this fraction of lr", ge=0, le=1)
    grad_clip: float = setting(0.5, "clip the global gradient norm to this (a huge value = no clipping)", gt=0)


RUN_DIR = "${dlr_run_dir:${model.name},${factorization.method},${factorization.rank},${factorization.alpha},${seed},${optimizer.name}}"


@dataclass
class CheckpointConfig:
    """Where the run lives and how it is saved and resumed."""

    out_dir: str = setting(RUN_DIR, "the run directory (default runs/<model>-<method>-r<rank>-a<alpha>-s<seed>)",
                           nonempty=True, runtime=True)
    resume: str = setting("auto", "auto (newest complete checkpoint; a finished run is left as it is) | never | "
                                  "a checkpoints/step_<N> dir", nonempty=True, runtime=True)
    save_every: int = setting(1000, "write checkpoints/step_<N> every N steps (and at the end)", ge=1, runtime=True)
    keep_last: int = setting(2, "training checkpoints kept; 0 = keep all", ge=0, runtime=True)
    resume_changed: bool = setting(False, "resume even where this run's settings differ from the checkpoint's (the "
                                          "refusal names them); model, optimizer, schedule and data position are "
                                          "restored as saved", runtime=True)
    verify: bool = setting(True, "check the size and sha256 of every file of the checkpoint resumed from; "
                                 "false = trusted files", runtime=True)


@dataclass
class WandbConfig:
    project: str = setting("dlr", "wandb project", nonempty=True)
    entity: Optional[str] = setting(None, "wandb entity (team); null = your default")
    name: Optional[str] = setting(None, "run name; null = the run directory's name")
    mode: Optional[str] = setting(None, "online | offline | disabled; null = wandb's own default",
                                  choices=(None, "online", "offline", "disabled"))


@dataclass
class LoggingConfig:
    """What is measured and reported while training (metrics.jsonl is always written)."""

    log_every: int = setting(10, "append a train record to metrics.jsonl every N steps", ge=1, runtime=True)
    eval_every: int = setting(1000, "validate every N steps (and at the end)", ge=1, runtime=True)
    logger: str = setting("none", "none | wandb (metrics.jsonl is always written)", choices=LOGGERS, runtime=True)
    wandb: WandbConfig = section(WandbConfig, "wandb run settings", runtime=True)


@dataclass
class SystemConfig:
    """How the run uses the hardware; none of it changes what is trained."""

    precision: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16", choices=PRECISIONS)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory", runtime=True)
    parallelism: str = setting("ddp", "ddp | fsdp2 (fully_shard per decoder layer; for 1B/7B, see docs/training.md)",
                               choices=PARALLELISMS, runtime=True)
    compile: Any = setting("auto", "auto (on for CUDA, off on CPU) | true | false: torch.compile of the decoder",
                           check=_compile, runtime=True)
    loss: str = setting("chunked", "how the LM loss is computed (dlr/model/fused_loss.py): chunked | liger | plain",
                        choices=LOSS_IMPLS, runtime=True)
    dry_run: bool = setting(False, "print the plan (params, FLOPs, batch, memory) and exit; nothing is written",
                            runtime=True)
    plan_processes: Optional[int] = setting(None, "dry_run only: plan for this many GPUs", ge=1, runtime=True)
