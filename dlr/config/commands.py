"""The settings of each command (dlr-train, dlr-eval, dlr-fold, dlr-quantize, dlr-finetune, dlr-prepare,
dlr-compare, dlr-scaling): one dataclass each, built from the sections and groups of `dlr.config.sections`.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Any, Optional

from .choices import DTYPE_NAMES, EVAL_PROTOCOLS, LOGGERS, OPTIMIZERS, PRECISIONS, QUANT_SCHEMES
from .fields import group, section, setting
from .sections import (MAX_LR, CheckpointConfig, DataConfig, FactorizationConfig, LoggingConfig, ModelConfig,
                       OPTIMIZER_SCHEMAS, ScheduleConfig, SystemConfig)


def _tasks(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and v.strip()) or (isinstance(v, (list, tuple)) and v
                                                            and all(isinstance(x, str) and x for x in v)):
        return None
    return "comma-separated task names, a list of them, or null"


def _device(v: Any) -> str | None:
    ok = v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit())
    return None if ok else "auto, cpu, cuda, cuda:N"


@dataclass
class TrainConfig:
    """dlr-train: configs/train.yaml picks the groups; every other key is declared in a section."""

    model: Any = group(ModelConfig, "configs/model/<name>.yaml: the LLaMA size and its recipe")
    seed: int = setting(0, "model init, data order and every RNG")
    factorization: FactorizationConfig = section(FactorizationConfig, "what each projection is")
    schedule: ScheduleConfig = section(ScheduleConfig, "steps, batch geometry and learning-rate schedule")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "the run directory, saving and resuming")
    logging: LoggingConfig = section(LoggingConfig, "metrics, validation cadence and loggers")
    system: SystemConfig = section(SystemConfig, "precision, parallelism, compilation")
    # After the sections: the optimizer's lr defaults to the schedule's, which is checked first.
    data: Any = group(DataConfig, "configs/data/<name>.yaml: where the text comes from")
    optimizer: Any = group(OPTIMIZER_SCHEMAS, "configs/optimizer/<name>.yaml: " + " | ".join(OPTIMIZERS))


# The same check for every command that reads a model directory (dlr.artifacts.model_dir.check_integrity).
VERIFY_HELP = ("check the sha256 of every file a loader reads (config, tokenizer, weights, code) against "
               "dlr_checkpoint.json before loading, and refuse a file it does not list; "
               "false also loads a directory without that file (trusted copies only)")


@dataclass
class EvalConfig:
    """dlr-eval (configs/eval.yaml)."""

    data: Any = group(DataConfig, "configs/data/<name>.yaml: where the text comes from")
    ckpt: str = setting(MISSING, "a model directory: <run>/final, <run>/folded, or a dlr-fold output", nonempty=True)
    eval_tokens: Optional[int] = setting(None, "token budget; overrides data.val_tokens (null = the data config's)",
                                         ge=1)
    batch_size: int = setting(16, "rows per forward; the result does not depend on it (token-weighted)", ge=1)
    device: str = setting("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N", check=_device)
    dtype: str = setting("fp32", "fp32 | bf16 (autocast; weights stay fp32)", choices=DTYPE_NAMES)
    out: Optional[str] = setting(None, "write {val_ppl, val_loss, tokens, ...} as JSON to this file", nonempty=True)
    json: bool = setting(False, "print the JSON result on stdout instead of the one-line summary (also --json)")
    progress: bool = setting(True, "progress bar on stderr (the first process only)")
    verify: bool = setting(True, VERIFY_HELP)
    protocol: str = setting("auto", "auto (sliding for data=text, rows otherwise) | sliding (every token of the "
                                    "concatenated corpus) | rows (the trainer's fixed validation set)",
                            choices=EVAL_PROTOCOLS)
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
    lr: float = setting(1e-4, "peak learning rate (AdamW, linear warmup then cosine to 0)", gt=0, le=MAX_LR)
    warmup_ratio: float = setting(0.1, "share of the steps spent warming up", ge=0, lt=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    batch_size: int = setting(8, "examples per step per device", ge=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", ge=1)
    max_length: int = setting(256, "tokens per example (prompt + response); longer ones are cut on the right", ge=2)
    seed: int = setting(0, "data order and initialisation of LoRA adapters")
    save_every: int = setting(50, "steps between resumable checkpoints (the last step is always saved)", ge=1, runtime=True)
    keep_last: int = setting(2, "resumable checkpoints kept", ge=1, runtime=True)
    resume: str = setting("auto", "auto (continue from the newest checkpoint in out_dir) | never", choices=("auto", "never"), runtime=True)
    lora: bool = setting(False, "train LoRA adapters on the low-rank factors (peft); merged at the end")
    lora_rank: int = setting(8, "LoRA rank of each adapter", ge=1)
    lora_alpha: float = setting(16.0, "LoRA scale numerator (scale = lora_alpha / lora_rank)", gt=0)
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", ge=0, lt=1)
    device: str = setting("auto", "auto (cuda if available, else cpu) | cpu | cuda", choices=("auto", "cpu", "cuda"), runtime=True)
    precision: str = setting("auto", "auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16", choices=PRECISIONS)
    logger: str = setting("none", "none | wandb", choices=LOGGERS, runtime=True)
    log_every: int = setting(10, "steps between loss lines in metrics.jsonl", ge=1, runtime=True)
    progress: bool = setting(True, "progress bar on stderr", runtime=True)
    verify: bool = setting(True, VERIFY_HELP, runtime=True)


@dataclass
class FoldConfig:
    """dlr-fold (configs/fold.yaml)."""

    data: Any = group(DataConfig, "configs/data/<name>.yaml: where the text comes from")
    ckpt: str = setting(MISSING, "input model directory (never modified)", nonempty=True)
    out: Optional[str] = setting(None, "output directory; default <parent>/folded for .../final, else <ckpt>-folded "
                                       "(<ckpt>-dense if dense)", nonempty=True)
    overwrite: bool = setting(False, "replace an existing out directory")
    dense: bool = setting(False, "export a plain dense LlamaForCausalLM (activation=identity only)")
    upgrade: bool = setting(False, "convert a format_version 2 model directory to the current format (tensors "
                                   "renamed, bytes unchanged; out default <ckpt>-v3); folds nothing")
    check_batches: int = setting(2, "validation batches whose logits must agree before anything is written", ge=1)
    batch_size: int = setting(2, "rows per check batch (of data.seq_len tokens)", ge=1)
    tolerance: float = setting(1e-4, "max |logits diff| / max |logits|, fp32", gt=0)
    device: str = setting("cpu", "cpu | cuda | cuda:N (the check runs in fp32 on this device)", check=_device)
    verify: bool = setting(True, VERIFY_HELP)


def _patterns(value: Any) -> str | None:
    import re

    def valid(entry: Any) -> bool:
        if not isinstance(entry, str) or not entry.removeprefix("re:"):
            return False
        try:
            re.compile(entry.removeprefix("re:"))
        except re.error:
            return False
        return True

    ok = isinstance(value, (list, tuple)) and all(valid(e) for e in value)
    return None if ok else 'a list of module names or valid re: patterns, e.g. ["re:.*mlp.(gate|up)_proj.B$"]'


@dataclass
class QuantizeConfig:
    """dlr-quantize (configs/quantize.yaml): a folded model directory quantized with compressed-tensors (dlr.artifacts.quantize)."""

    data: Any = group(DataConfig, "configs/data/<name>.yaml: the validation text of the perplexity check")
    ckpt: str = setting(MISSING, "a folded (or plain low-rank, or dense) model directory, never modified; an unfolded "
                                 "DLR directory is refused", nonempty=True)
    scheme: str = setting("w8a8", "w8a8 (int8 weights per channel, int8 activations per token) | w4a16 (4-bit "
                                  "weights, activations unquantized)", choices=QUANT_SCHEMES)
    group_size: Optional[int] = setting(None, "w4a16: one scale per this many inputs (must divide every factor's input "
                                              "size); null = one scale per output channel", ge=2)
    ignore: list[str] = setting([], "layers kept unquantized besides the LM head: module names or `re:` patterns, as "
                                    "llm-compressor takes them (quoted, e.g. ignore=['re:.*mlp[.](gate|up)_proj[.]B$'])", check=_patterns)
    out: Optional[str] = setting(None, "output directory; default <ckpt>-<scheme>", nonempty=True)
    overwrite: bool = setting(False, "replace an existing out directory")
    eval_tokens: Optional[int] = setting(None, "validation tokens of the check (null = the data config's val_tokens)",
                                         ge=1)
    batch_size: int = setting(4, "rows per check batch (of data.seq_len tokens)", ge=1)
    max_ppl_ratio: float = setting(1.05, "the written model's perplexity over the unquantized one's must not exceed "
                                         "this", ge=1)
    min_agreement: float = setting(0.9, "share of validation positions whose greedy (argmax) token must equal the "
                                        "unquantized model's", ge=0, le=1)
    device: str = setting("cpu", "cpu | cuda | cuda:N (quantization and check run in fp32 here)", check=_device)
    verify: bool = setting(True, VERIFY_HELP)


@dataclass
class PrepareConfig:
    """dlr-prepare (configs/prepare.yaml): tokenize a data config once into token shards for data=tokens."""

    data: Any = group(DataConfig, "configs/data/<name>.yaml: where the text comes from")
    out: str = setting(MISSING, "output directory (created; an unfinished one is resumed, a finished one is kept)",
                       nonempty=True)
    tokens: Optional[int] = setting(None, "train split: stop after the document that reaches this many tokens "
                                          "(null = all)", ge=1)
    documents: Optional[int] = setting(None, "train split: stop after this many documents (null = all); not with "
                                             "tokens", ge=1)
    num_proc: int = setting(1, "processes tokenizing input files side by side (one shard per input file)", ge=1)
    progress: bool = setting(True, "progress bar (tokens/s) on stderr")


def _budgets(v: Any) -> str | None:
    import math

    ok = v is None or (isinstance(v, (list, tuple)) and v and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0 for c in v))
    return None if ok else "positive FLOP budgets, comma-separated (e.g. at=1e18,1e19), or null"


def _names(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v)
    return None if ok else "comma-separated names, e.g. alpha,rank"


RUNS_HELP = "run directories, globs (quoted) or folders of runs; usually given bare, before or between the settings"


@dataclass
class CompareConfig:
    """dlr-compare (configs/compare.yaml): runs given bare, every other setting key=value."""

    runs: list = setting([], RUNS_HELP, check=_names)
    out: Optional[str] = setting(None, "write table.md, table.csv, pairs.csv and PNG plots into this directory",
                                 nonempty=True)
    metric: str = setting("val_ppl", "summary.json key to compare (val_ppl, val_loss, folded_val_ppl, ...)",
                          nonempty=True)
    plots: bool = setting(True, "write the PNG plots with out= (false: no matplotlib import)")
    by: list = setting([], "sweep view over these config keys (alpha, rank, expand, scope, variance_correction, "
                           "optimizer.weight_decay, ...), comma-separated", check=_names)


@dataclass
class ScalingConfig:
    """dlr-scaling (configs/scaling.yaml): runs given bare, every other setting key=value."""

    runs: list = setting([], RUNS_HELP, check=_names)
    out: Optional[str] = setting(None, "write fit.json, table.md, table.csv and the plots into this directory",
                                 nonempty=True)
    at: Optional[list] = setting(None, "FLOP budgets to predict at, comma-separated; null = the three decades from the "
                            "largest run's", check=_budgets)
    metric: str = setting("val_loss", "summary.json loss to fit, in nats (val_loss, folded_val_loss, ...)",
                          nonempty=True)
    bootstrap: int = setting(200, "bootstrap refits for the intervals (0 = no intervals)", ge=0)
    seed: int = setting(0, "seed of the bootstrap resampling")
    level: float = setting(0.95, "interval level", gt=0, lt=1)
    plots: bool = setting(True, "write the PNG plots with out= (false: no matplotlib import)")


COMMAND_SCHEMAS: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig, "fold": FoldConfig,
                                    "prepare": PrepareConfig, "compare": CompareConfig, "scaling": ScalingConfig,
                                    "finetune": FinetuneConfig, "quantize": QuantizeConfig}
# Settings a command also takes bare on its command line (an argument without `=`), appended in order.
POSITIONAL: dict[str, str] = {"compare": "runs", "scaling": "runs"}
# Sections of a command whose keys are also accepted bare on the command line (`rank=8` for
# `factorization.rank=8`): their leaf names are unique across them.
SHORT_SECTIONS: dict[str, tuple[str, ...]] = {
    "train": ("factorization", "schedule", "checkpoint", "logging", "system"),
}
