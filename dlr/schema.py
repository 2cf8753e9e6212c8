"""The one schema: every setting of dlr-train, dlr-eval, dlr-fold, dlr-compare and of the
model / data / optimizer config groups, with its type, default, accepted range and meaning.

Each setting is one `setting(...)` line in one dataclass below. The dataclasses are
registered as Hydra structured configs (ConfigStore), so the YAML files under configs/ only
pick group options and hold per-size / per-dataset values; the defaults and the meaning of
every key live here, once.

Adding a setting is one line here, e.g. in `TrainConfig`:

    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", ge=0, lt=1)

The field is then a valid `key=value` override (typed by OmegaConf), range-checked by
`validate` before anything runs (dry_run too), listed in `did you mean` suggestions, and
written to config.yaml. If it must not make a resumed run "another run" (it changes how,
not what, is trained), add its name to `RUNTIME_KEYS` in dlr/train/rundir.py.

What `validate` refuses, each with one line naming the key and what is accepted:
- an unknown key anywhere (also `+key=...`, which Hydra force-adds past struct mode), with the
  closest valid name (difflib);
- a value of the wrong type, out of range, or not among the choices;
- a required (`???`) value left unset.
Checks that tie several settings together live with the code that derives from them
(`dlr.model.check_factorization`, `dlr.train.plan.make_plan`, `dlr.data.data_spec`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Optional

from dlr.errors import ConfigError, bad_value

# Choices of the factorization; the model code (dlr/hf/lowrank.py) defines what they mean.
from dlr.data.spec import MODES, SAMPLE_BY, SOURCES
from dlr.hf.lowrank import ACTIVATIONS, EXPAND_MODES, METHODS, SCOPES
from dlr.loss import LOSS_IMPLS
from dlr.optim.spectron import NS_DTYPES


def setting(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            nonempty: bool = False, check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with its meaning (`doc`) and its accepted values.

    ge/gt/le/lt bound numbers; `choices` lists accepted strings; `nonempty` refuses "" for
    strings; `check(value)` returns what is accepted when the value is refused, else None.
    """
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "nonempty": nonempty,
            "check": check}
    if default is MISSING:
        default = "???"  # OmegaConf's "required"; keeps dataclass field order free
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _betas(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)
    return None if ok else "a list of 2 numbers in [0, 1), e.g. [0.9,0.95]"


def _files(v: Any) -> str | None:
    if v is None or (isinstance(v, str)) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v)):
        return None
    return "a path, a glob, or a list of them"


def _tasks(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and v.strip()) or (isinstance(v, (list, tuple)) and v
                                                            and all(isinstance(x, str) and x for x in v)):
        return None
    return "comma-separated task names, a list of them, or null"


def _compile(v: Any) -> str | None:
    return None if v in ("auto", True, False) and not (isinstance(v, int) and not isinstance(v, bool)) else "auto, true, false"


def _device(v: Any) -> str | None:
    ok = v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit())
    return None if ok else "auto, cpu, cuda, cuda:N"


# ----------------------------------------------------------------------------- config groups


@dataclass
class ModelConfig:
    """configs/model/<name>.yaml: a LLaMA size and its training recipe."""

    name: str = setting(MISSING, "the size's name (llama_tiny ... llama_7b)", nonempty=True)
    hidden_size: int = setting(MISSING, "model width d", gt=0)
    intermediate_size: int = setting(MISSING, "MLP width", gt=0)
    num_attention_heads: int = setting(MISSING, "attention heads (hidden_size must divide by it)", gt=0)
    num_hidden_layers: int = setting(MISSING, "transformer blocks", gt=0)
    max_position_embeddings: int = setting(1024, "longest sequence the rotary tables cover", gt=0)
    default_rank: int = setting(MISSING, "rank used when rank= is not given", gt=0)
    steps: int = setting(MISSING, "recipe: optimizer steps", gt=0)
    lr: float = setting(MISSING, "recipe: peak learning rate", gt=0)
    micro_batch: int = setting(MISSING, "recipe: sequences per process per forward", gt=0)
    global_batch: int = setting(512, "recipe: sequences per optimizer step over all processes", gt=0)


@dataclass
class DataConfig:
    """configs/data/<name>.yaml; `dlr.data.data_spec` turns it into a DataSpec."""

    source: str = setting("hub", "hub (HF hub streaming) | json (JSON-lines files) | text (plain text files)",
                          choices=SOURCES)
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
    mode: str = setting("paper", "paper (truncate/pad each document) | packed (EOS-joined windows)",
                        choices=MODES)
    shuffle_buffer: int = setting(10_000, "documents shuffled in blocks of this many; 0 = no shuffling", ge=0)
    num_workers: int = setting(2, "DataLoader worker processes for the train stream (0 = in process)", ge=0)
    val_tokens: Optional[int] = setting(10_000_000, "validation budget: the first N tokens; null = whole split", ge=1)
    prefetch: int = setting(4, "source=tokens: batches built ahead in a background thread (0 = in the training step)",
                            ge=0)


@dataclass
class AdamWConfig:
    """configs/optimizer/adamw.yaml: torch AdamW, weight decay on 2-D weights only."""

    name: str = setting("adamw", "the optimizer", choices=("adamw",))
    lr: float = setting("${lr}", "learning rate (the trainer's top-level lr unless set here)", gt=0)
    weight_decay: float = setting(0.01, "decoupled weight decay on 2-D weights", ge=0)
    betas: list[float] = setting([0.9, 0.999], "Adam moment decay rates", check=_betas)
    eps: float = setting(1e-8, "Adam denominator epsilon", gt=0)


@dataclass
class SpectronConfig:
    """configs/optimizer/spectron.yaml: Spectron on A/B factor pairs, AdamW on the rest (docs/spectron.md)."""

    name: str = setting("spectron", "the optimizer", choices=("spectron",))
    lr: float = setting("${lr}", "factor step: each factor moves by lr / (||A||_2 + ||B||_2 + 1)", gt=0)
    weight_decay: float = setting(0.01, "decoupled, lr * weight_decay, on factors and 2-D AdamW weights", ge=0)
    momentum: float = setting(0.9, "M <- momentum * M + (1 - momentum) * grad", ge=0, lt=1)
    ns_steps: int = setting(5, "Newton-Schulz iterations per orthogonalization", ge=1)
    power_init_iters: int = setting(10, "power iterations on the first step only; then 1 per step", ge=1)
    ns_dtype: str = setting("float32", "Newton-Schulz dtype (bfloat16 only takes effect on CUDA)",
                            choices=NS_DTYPES)
    seed: int = setting(0, "seeds the power-iteration start vectors (same on every rank)")
    adamw_lr: Optional[float] = setting(None, "AdamW part (embeddings, lm_head, norms); null = lr", gt=0)
    adamw_weight_decay: Optional[float] = setting(None, "AdamW part; null = weight_decay", ge=0)
    betas: list[float] = setting([0.9, 0.999], "AdamW part: moment decay rates", check=_betas)
    eps: float = setting(1e-8, "AdamW part: epsilon", gt=0)


OPTIMIZER_SCHEMAS: dict[str, type] = {"adamw": AdamWConfig, "spectron": SpectronConfig}


@dataclass
class WandbConfig:
    project: str = setting("dlr", "wandb project", nonempty=True)
    entity: Optional[str] = setting(None, "wandb entity (team); null = your default")
    name: Optional[str] = setting(None, "run name; null = the run directory's name")
    mode: Optional[str] = setting(None, "online | offline | disabled; null = wandb's own default",
                                  choices=(None, "online", "offline", "disabled"))


# ----------------------------------------------------------------------------- commands


@dataclass
class TrainConfig:
    """dlr-train (configs/train.yaml picks the groups)."""

    model: ModelConfig = "???"
    data: Any = "???"  # DataConfig; untyped in OmegaConf so a data file's `???` (required) survives the merge
    optimizer: Any = "???"  # AdamWConfig | SpectronConfig, chosen by the optimizer group

    method: str = setting("dlr", "full (dense) | lowrank (y = B act(A x)) | dlr (lowrank + the DLR residual)",
                          choices=METHODS)
    rank: Optional[int] = setting("${model.default_rank}", "rank r of every factorized projection", gt=0)
    alpha: float = setting(1.0, "DLR residual scale: alpha / sqrt(K) (or alpha, see variance_correction)", ge=0)
    activation: str = setting("silu", "silu (CoLA) | identity (plain W = BA) | gelu | relu", choices=ACTIVATIONS)
    expand: str = setting("uniform", "uniform (output o reads latent o // K) | random_reuse (reference: drawn with "
                                     "replacement, seeded per layer) | permuted (uniform index shuffled; the old "
                                     "random_reuse)", choices=EXPAND_MODES)
    scope: str = setting("all", "which projections carry the DLR residual", choices=SCOPES)
    variance_correction: bool = setting(True, "residual scale alpha / sqrt(K); false: plain alpha")
    trainable_alpha: bool = setting(False, "alpha is one trainable scalar per DLR layer (folded with its learned value)")
    latent_alpha: Optional[float] = setting(None, "fixed latent scale latent_alpha / rank on act(A x) (lowrank and dlr); "
                                                  "null = none", gt=0)
    trainable_latent_scale: bool = setting(False, "latent scale tanh(p), p a trainable scalar per layer starting at 1 "
                                                  "(excludes latent_alpha)")
    bias: bool = setting(False, "output bias on every projection (LLaMA has none)")
    seed: int = setting(0, "model init, data order and every RNG")

    steps: int = setting("${model.steps}", "optimizer steps (ignored when tokens is set)", gt=0)
    tokens: Optional[float] = setting(None, "token budget; sets steps = ceil(tokens / tokens per step)", gt=0)
    lr: float = setting("${model.lr}", "peak learning rate", gt=0)
    global_batch: int = setting("${model.global_batch}", "sequences per optimizer step, over all processes", gt=0)
    micro_batch: int = setting("${model.micro_batch}", "sequences per process per forward; accumulation is derived",
                               gt=0)
    warmup: float = setting(0.1, "linear warmup from 0, as a fraction of steps", ge=0, lt=1)
    min_lr_ratio: float = setting(0.1, "cosine decays to this fraction of lr", ge=0, le=1)
    grad_clip: float = setting(0.5, "clip the global gradient norm to this (a huge value = no clipping)", gt=0)

    eval_every: int = setting(1000, "validate every N steps (and at the end)", ge=1)
    save_every: int = setting(1000, "write checkpoints/step_<N> every N steps (and at the end)", ge=1)
    keep_last: int = setting(2, "training checkpoints kept; 0 = keep all", ge=0)
    log_every: int = setting(10, "append a train record to metrics.jsonl every N steps", ge=1)

    out_dir: str = setting("${dlr_run_dir:${model.name},${method},${rank},${alpha},${seed},${optimizer.name}}",
                           "the run directory", nonempty=True)
    resume: str = setting("auto", "auto (newest complete checkpoint; a finished run is left as it is) | never | "
                                  "a checkpoints/step_<N> dir", nonempty=True)
    dry_run: bool = setting(False, "print the plan (params, FLOPs, batch, memory) and exit; nothing is written")
    plan_processes: Optional[int] = setting(None, "dry_run only: plan for this many GPUs", ge=1)

    precision: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16", choices=("auto", "fp32", "bf16"))
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    parallelism: str = setting("ddp", "ddp | fsdp2 (fully_shard per decoder layer; for 1B/7B, see docs/training.md)",
                               choices=("ddp", "fsdp2"))
    compile: Any = setting("auto", "auto (on for CUDA, off on CPU) | true | false: torch.compile of the decoder layers",
                           check=_compile)
    loss: str = setting("auto", "how the LM loss is computed (dlr/loss.py): auto | chunked | liger | plain",
                        choices=LOSS_IMPLS)
    fuse_latents: bool = setting(False, "q/k/v and gate/up latents from one GEMM each, x cat(A_i)^T then split "
                                        "(a compute layout: parameters, checkpoints and the fold are unchanged)")
    compile_region: bool = setting(False, "with compile on and parallelism=ddp: the decoder layer's body traced and "
                                          "compiled once (torch.compiler.nested_compile_region), not once per layer, "
                                          "so the first step's compile stops growing with depth; off until measured on a GPU")

    logger: str = setting("none", "none | wandb (metrics.jsonl is always written)", choices=("none", "wandb"))
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    """dlr-eval (configs/eval.yaml)."""

    data: Any = "???"  # DataConfig (see TrainConfig.data)
    ckpt: str = setting(MISSING, "a model directory: <run>/final, <run>/folded, or a dlr-fold output", nonempty=True)
    eval_tokens: Optional[int] = setting(None, "token budget; overrides data.val_tokens (null = the data config's)",
                                         ge=1)
    batch_size: int = setting(16, "rows per forward; the result does not depend on it (token-weighted)", ge=1)
    device: str = setting("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N", check=_device)
    dtype: str = setting("fp32", "fp32 | bf16 (autocast; weights stay fp32)", choices=("fp32", "bf16"))
    out: Optional[str] = setting(None, "write {val_ppl, val_loss, tokens, ...} as JSON to this file", nonempty=True)
    json: bool = setting(False, "print the JSON result on stdout instead of the one-line summary (also --json)")
    progress: bool = setting(True, "progress bar on stderr (rank 0 only)")
    verify: bool = setting(True, "check every weight file's sha256 against dlr_checkpoint.json before loading")
    protocol: str = setting("auto", "auto (sliding for data=text, rows otherwise) | sliding (every token of the "
                                    "concatenated corpus) | rows (the trainer's fixed validation set)",
                            choices=("auto", "sliding", "rows"))
    stride: Optional[int] = setting(None, "sliding: new tokens each window scores, 1 <= stride < data.seq_len; "
                                          "null = seq_len // 2", ge=1)
    min_coverage: float = setting(0.99, "data=text: scoring less than this share of the corpus's tokens is an error",
                                  ge=0, le=1)
    tasks: Any = setting(None, "lm-evaluation-harness task names, comma-separated or a list (hub tasks, or the "
                               "bundled c4_cloze); null = perplexity only", check=_tasks)
    num_fewshot: Optional[int] = setting(None, "tasks: few-shot examples per question (null = each task's default)",
                                         ge=0)
    limit: Optional[int] = setting(None, "tasks: at most this many examples per task (null = all)", ge=1)
    include_path: Optional[str] = setting(None, "tasks: extra folder of task YAMLs to register (the bundled tasks "
                                                "are always registered)", nonempty=True)


@dataclass
class FinetuneConfig:
    """dlr-finetune (configs/finetune.yaml): supervised fine-tuning of a model directory (dlr.finetune)."""

    ckpt: str = setting(MISSING, "the model directory to fine-tune: <run>/folded, <run>/final, a dlr-fold output",
                        nonempty=True)
    train_data: str = setting(MISSING, "a .jsonl / .json file of {prompt, response} records, or a hub dataset id "
                                       "(`data=` on the command line is short for this)", nonempty=True)
    train_split: str = setting("train", "hub datasets: the split to train on (local files have one split)",
                               nonempty=True)
    prompt_field: str = setting("prompt", "record field holding the prompt (context, never in the loss)",
                                nonempty=True)
    response_field: str = setting("response", "record field holding the response (the only tokens in the loss)",
                                  nonempty=True)
    eval_data: Optional[str] = setting(None, "held-out file / hub id in the same format: response loss before and "
                                             "after", nonempty=True)
    eval_split: str = setting("validation", "hub eval_data: its split", nonempty=True)
    out_dir: Optional[str] = setting(None, "checkpoints/, final/, config.yaml, metrics.jsonl, summary.json; "
                                           "null = <ckpt>-sft", nonempty=True)
    steps: int = setting(100, "optimizer steps", ge=1)
    lr: float = setting(1e-4, "peak learning rate (AdamW, linear warmup then cosine to 0)", gt=0)
    warmup_ratio: float = setting(0.1, "share of the steps spent warming up", ge=0, lt=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    batch_size: int = setting(8, "examples per step per device", ge=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", ge=1)
    max_length: int = setting(256, "tokens per example (prompt + response); longer ones are cut on the right", ge=2)
    seed: int = setting(0, "data order and initialisation of LoRA adapters")
    save_every: int = setting(50, "steps between resumable checkpoints (the last step is always saved)", ge=1)
    keep_last: int = setting(2, "resumable checkpoints kept", ge=1)
    resume: str = setting("auto", "auto (continue from the newest checkpoint in out_dir) | never", choices=("auto", "never"))
    lora: bool = setting(False, "train LoRA adapters on the low-rank factors (peft); merged at the end")
    lora_rank: int = setting(8, "LoRA rank of each adapter", ge=1)
    lora_alpha: float = setting(16.0, "LoRA scale numerator (scale = lora_alpha / lora_rank)", gt=0)
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", ge=0, lt=1)
    device: str = setting("auto", "auto (cuda if available, else cpu) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    precision: str = setting("auto", "auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16", choices=("auto", "fp32", "bf16"))
    logger: str = setting("none", "none | wandb", choices=("none", "wandb"))
    log_every: int = setting(10, "steps between loss lines in metrics.jsonl", ge=1)
    progress: bool = setting(True, "progress bar on stderr")


@dataclass
class FoldConfig:
    """dlr-fold (configs/fold.yaml)."""

    data: Any = "???"  # DataConfig (see TrainConfig.data)
    ckpt: str = setting(MISSING, "input model directory (never modified)", nonempty=True)
    out: Optional[str] = setting(None, "output directory; default <parent>/folded for .../final, else <ckpt>-folded "
                                       "(<ckpt>-dense if dense)", nonempty=True)
    overwrite: bool = setting(False, "replace an existing out directory")
    dense: bool = setting(False, "export a plain dense LlamaForCausalLM (activation=identity only)")
    check_batches: int = setting(2, "validation batches whose logits must agree before anything is written", ge=1)
    batch_size: int = setting(2, "rows per check batch (of data.seq_len tokens)", ge=1)
    tolerance: float = setting(1e-4, "max |logits diff| / max |logits|, fp32", gt=0)
    device: str = setting("cpu", "cpu | cuda | cuda:N (the check runs in fp32 on this device)", check=_device)
    verify: bool = setting(True, "check every weight file's sha256 against dlr_checkpoint.json before loading")


@dataclass
class PrepareConfig:
    """dlr-prepare (configs/prepare.yaml): tokenize a data config once into token shards for data=tokens."""

    data: Any = "???"  # DataConfig (see TrainConfig.data)
    out: str = setting(MISSING, "output directory (created; an unfinished one is resumed, a finished one is kept)",
                       nonempty=True)
    tokens: Optional[int] = setting(None, "train split: stop after the document that reaches this many tokens "
                                          "(null = all)", ge=1)
    documents: Optional[int] = setting(None, "train split: stop after this many documents (null = all); not with "
                                             "tokens", ge=1)
    num_proc: int = setting(1, "processes tokenizing input files side by side (one shard per input file)", ge=1)
    progress: bool = setting(True, "progress bar (tokens/s) on stderr")


@dataclass
class CompareConfig:
    """dlr-compare (argparse: `runs` positional, the rest --flags)."""

    runs: list = setting([], "run directories, globs (quote them) or multirun folders")
    out: Optional[str] = setting(None, "write table.md, table.csv, pairs.csv and PNG plots into this directory",
                                 nonempty=True)
    metric: str = setting("val_ppl", "summary.json key to compare (val_ppl, val_loss, folded_val_ppl, ...)",
                          nonempty=True)
    no_plots: bool = setting(False, "skip the PNG plots (no matplotlib import)")
    by: list = setting([], "sweep view over this config key (alpha, rank, expand, scope, variance_correction, ...); "
                           "repeatable")


COMMAND_SCHEMAS: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig, "fold": FoldConfig,
                                    "prepare": PrepareConfig, "compare": CompareConfig, "finetune": FinetuneConfig}
# Config groups: their option files live in configs/<group>/, their schema is this.
GROUP_SCHEMAS: dict[str, type] = {"model": ModelConfig}
# Groups whose node is checked by `validate` (not typed by OmegaConf), by their key.
UNTYPED_GROUPS: dict[str, type] = {"data": DataConfig}


def register() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent).

    configs/<command>.yaml start with `- <command>_schema`; group files with `- <group>_schema`
    (e.g. configs/model/llama_tiny.yaml), so every key and type comes from here.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    for name, node in COMMAND_SCHEMAS.items():
        if name != "compare":
            cs.store(name=f"{name}_schema", node=node)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    for name, node in OPTIMIZER_SCHEMAS.items():
        cs.store(group="optimizer", name=f"{name}_schema", node=node)
    from dlr.train.rundir import run_name

    OmegaConf.register_new_resolver("dlr_run_dir", lambda *parts: run_name(*parts), replace=True)


# ----------------------------------------------------------------------------- validation


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_ok(tp: Any, v: Any) -> tuple[bool, str]:
    """(accepted?, description) for the annotation string of a field."""
    tp = str(tp).replace("typing.", "")
    optional = tp.startswith("Optional[")
    base = tp[len("Optional["):-1] if optional else tp
    if v is None:
        return optional, base + (" or null" if optional else "")
    if base == "int":
        return isinstance(v, int) and not isinstance(v, bool), "an integer"
    if base == "float":
        return _is_number(v) and math.isfinite(v), "a finite number"
    if base == "bool":
        return isinstance(v, bool), "true, false"
    if base == "str":
        return isinstance(v, str), "a string"
    return True, base


def describe_field(f: dataclasses.Field) -> str:
    """What a field accepts, in words (for error messages and docs)."""
    m = f.metadata
    _, kind = _type_ok(f.type, object())
    if m.get("choices"):
        return ", ".join("null" if c is None else str(c) for c in m["choices"])
    bounds = [f"{op} {m[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if m.get(k) is not None]
    desc = kind
    if bounds:
        desc += " " + " and ".join(bounds)
    if str(f.type).startswith("Optional") or str(f.type).startswith("typing.Optional"):
        desc += ", or null"
    return desc


def check_field(schema: type, name: str, value: Any, label: str | None = None) -> Any:
    """Check one value against its field of `schema`; returns it, or raises a one-line ConfigError."""
    f = {x.name: x for x in dataclasses.fields(schema)}[name]
    label = label or name
    m = f.metadata
    if m.get("check"):
        why = m["check"](value)
        if why:
            raise bad_value(label, value, why)
        return value
    ok, _ = _type_ok(f.type, value)
    if not ok:
        raise bad_value(label, value, describe_field(f))
    if value is None:
        return value
    if m.get("choices") and value not in m["choices"]:
        raise bad_value(label, value, describe_field(f))
    if m.get("nonempty") and value == "":
        raise bad_value(label, value, "a non-empty string")
    if _is_number(value):
        for key, test in (("ge", lambda a, b: a >= b), ("gt", lambda a, b: a > b), ("le", lambda a, b: a <= b),
                          ("lt", lambda a, b: a < b)):
            if m.get(key) is not None and not test(value, m[key]):
                raise bad_value(label, value, describe_field(f))
    return value


def unknown_key(key: str, known: list[str], prefix: str = "") -> ConfigError:
    """`prefix+key` is no setting: one line with the closest valid name (difflib)."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {prefix + close[0]!r}?" if close else f"accepted: {', '.join(prefix + k for k in sorted(known))}"
    return ConfigError(f"unknown setting {prefix + key!r}; {hint}")


def _schema_of(node: Any, default: type | None) -> type | None:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            t = OmegaConf.get_type(node)
            if dataclasses.is_dataclass(t):
                return t
    except ImportError:  # pragma: no cover
        pass
    return default


def _required(label: str, f: dataclasses.Field) -> ConfigError:
    doc = f.metadata.get("doc")
    return ConfigError(f"{label} is required (it is unset); set {label}=<{doc}>" if doc else
                       f"{label} is required (it is unset); set {label}=...")


def validate(schema: type, cfg: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse unknown keys, missing required values and bad types / ranges, with one line.

    `cfg` is a composed (resolved or resolvable) DictConfig or a plain mapping.
    """
    from omegaconf import DictConfig, OmegaConf

    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg:
        if key not in fields:
            raise unknown_key(str(key), list(fields), prefix)
    for name, f in fields.items():
        label = prefix + name
        missing = OmegaConf.is_missing(cfg, name) if isinstance(cfg, DictConfig) else \
            (name not in cfg and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise _required(label, f)
        if name not in cfg:
            continue
        try:
            value = cfg[name]
        except Exception as e:  # an interpolation that does not resolve
            raise ConfigError(f"{label} cannot be resolved ({' '.join(str(e).split())[:160]})") from None
        if isinstance(value, str) and value == "???":
            raise _required(label, f)
        sub = _nested_schema(f, value, label)
        if sub is not None:
            validate(sub, value, label + ".")
            continue
        if isinstance(value, (DictConfig, dict)):
            raise bad_value(label, OmegaConf.to_container(value) if isinstance(value, DictConfig) else value,
                            describe_field(f))
        if not isinstance(value, (str, int, float, bool, type(None))):
            value = OmegaConf.to_container(value) if not isinstance(value, (list, tuple)) else list(value)
        check_field(schema, name, value, label)


def _nested_schema(f: dataclasses.Field, value: Any, label: str) -> type | None:
    if label.split(".")[-1] == "optimizer" and f.type in ("Any", Any):
        if not hasattr(value, "get"):
            raise bad_value(label, value, ", ".join(OPTIMIZER_SCHEMAS))
        name = value.get("name")
        if name not in OPTIMIZER_SCHEMAS:
            raise bad_value(label, name, ", ".join(OPTIMIZER_SCHEMAS))
        return OPTIMIZER_SCHEMAS[name]
    if f.type in ("Any", Any) and f.name in UNTYPED_GROUPS:
        return UNTYPED_GROUPS[f.name]
    for t in (ModelConfig, DataConfig, WandbConfig):
        if f.type in (t.__name__, t):
            return t
    return _schema_of(value, None) if hasattr(value, "keys") else None


def all_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a command (optimizer keys of every optimizer), for override checks."""
    out = []
    for f in dataclasses.fields(schema):
        if f.name == "optimizer" and schema is TrainConfig:
            names = sorted({g.name for s in OPTIMIZER_SCHEMAS.values() for g in dataclasses.fields(s)})
            out += [f"{prefix}optimizer.{n}" for n in names]
            continue
        sub = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "WandbConfig": WandbConfig}.get(str(f.type))
        sub = UNTYPED_GROUPS.get(f.name, sub) if str(f.type) == "Any" else sub
        out += all_keys(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return out


def load(schema: type, cfg: Mapping[str, Any], prefix: str = "") -> Any:
    """Validate a (possibly partial) mapping and return the schema's dataclass, defaults filled in.

    For the Python API (`build_optimizer(dict(...))`, `data_spec({...})`); the CLIs validate the
    composed config with `validate`, which this calls too.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        missing = [k for k in cfg if OmegaConf.is_missing(cfg, k)]
        if missing and missing[0] in {f.name for f in dataclasses.fields(schema)}:
            raise _required(prefix + missing[0], {f.name: f for f in dataclasses.fields(schema)}[missing[0]])
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        except Exception as e:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'} cannot be resolved ({' '.join(str(e).split())[:160]})") from None
    values: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
    cfg = dict(cfg)
    if isinstance(cfg.get("defaults"), list):
        del cfg["defaults"]  # a group file read as plain YAML: Hydra's defaults list, not a setting
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for k, v in cfg.items():
        if v == "???" and k in fields:
            raise _required(prefix + k, fields[k])
        values[k] = v
    validate(schema, values, prefix)
    return schema(**values)


def find_field(schema: type, dotted: str) -> dataclasses.Field | None:
    """The field a dotted key names (optimizer keys: in whichever optimizer schema has it)."""
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if head not in fields:
        return None
    f = fields[head]
    if not rest:
        return f
    if schema is TrainConfig and head == "optimizer":
        return next((g for s in OPTIMIZER_SCHEMAS.values() for g in dataclasses.fields(s) if g.name == rest), None)
    sub = UNTYPED_GROUPS.get(head) if str(f.type) == "Any" else \
        {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "WandbConfig": WandbConfig}.get(str(f.type))
    return find_field(sub, rest) if sub else None
