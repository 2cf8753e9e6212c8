"""Supervised fine-tuning of a model directory with TRL's SFTTrainer (loss on the responses only).

Data flows as in pre-training: config -> (model directory, prompt/response data) -> trainer ->
model directory. The model is the `DlrLlamaForCausalLM` that `load_model_dir` built and
checked, trained in place: its projections stay `LowRankLinear` factors, so the result has
exactly the parameter count of the input (checked before writing). With `lora=true`, peft
puts LoRA adapters on the factors themselves (`target_parameters`: `*.A.weight`, `*.B.weight`; dense
`nn.Linear` projections of a `full` model through `target_modules`) and merges them back at
the end, so the output is again a plain model directory of the same shape.

The run directory mirrors the trainer's: `config.yaml`, `checkpoints/checkpoint-<N>/` (the HF
Trainer's resumable state), `metrics.jsonl`, `final/` (a model directory) and `summary.json`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from dlr.atomic import check_writable
from dlr.errors import ConfigError
from dlr.config import FinetuneConfig, runtime_keys, to_dict

log = logging.getLogger("dlr.finetune")
LOCAL_DATA = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
RUNTIME_KEYS = runtime_keys(FinetuneConfig)


def validate(cfg: FinetuneConfig) -> None:
    """What ties two settings together; each setting's own type, range and choices were checked
    where it is declared (dlr.config.FinetuneConfig) when the config was built."""
    if cfg.prompt_field == cfg.response_field:
        raise ConfigError(f"prompt_field and response_field are both {cfg.prompt_field!r}; they must name two fields")


def out_dir_of(cfg: FinetuneConfig, ckpt: Path) -> Path:
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir is not None else ckpt.parent / f"{ckpt.name}-sft"
    ck, o = ckpt.resolve(), out.resolve()
    if o == ck or ck in o.parents or o in ck.parents:
        raise ConfigError(f"out_dir={str(out)!r} overlaps ckpt={str(ckpt)!r}; accepted: a separate directory")
    blocker = next((p for p in (o, *o.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"out_dir={str(out)!r}: {str(blocker)!r} is a file, not a directory; accepted: a directory "
                          "(new, or a fine-tuning run to resume)")
    check_writable(out, "out_dir")
    return out


def _is_local(spec: str) -> bool:
    return spec.endswith(LOCAL_DATA) or spec.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(spec))


def load_pairs(spec: str, split: str, prompt_field: str, response_field: str, key: str = "data"):
    """`key` names the setting in error messages (data= on the command line, or eval_data=)."""
    # A `datasets.Dataset` with exactly the columns TRL's prompt-completion format wants.
    import datasets

    # Our one-line errors must stay one line: no "Generating train split" bars and no log
    # records of datasets' own (it logs a parse failure before raising it) on stderr.
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return _load_pairs(spec, split, prompt_field, response_field, key)
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    """The first line of an error and of what caused it: datasets wraps the parser's message."""
    for err in (e.__cause__, e):
        text = str(err).strip() if err is not None else ""
        if text:
            return text.splitlines()[0]
    return type(e).__name__


def _load_pairs(spec: str, split: str, prompt_field: str, response_field: str, key: str):
    import datasets

    from dlr.data.sources import _is_blank

    if _is_local(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}={spec!r} does not exist; accepted: a .jsonl/.json file of "
                              f"{{{prompt_field}, {response_field}}} records, or a hub dataset id")
        if _is_blank(str(path)):
            raise ConfigError(f"{key}={spec!r} holds no records; accepted: a .jsonl/.json file of "
                              f"{{{prompt_field}, {response_field}}} records")
        try:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as e:
            raise ConfigError(f"{key}={spec!r} is not JSON lines ({_first_line(e)[:120]})") from None
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as e:
            raise ConfigError(f"{key}={spec!r}: cannot load split {split!r} from the hub "
                              f"({_first_line(e)[:160]}); offline, give a local .jsonl file") from None
    missing = [f for f in (prompt_field, response_field) if f not in ds.column_names]
    if missing:
        raise ConfigError(f"{key}={spec!r}: records lack field(s) {', '.join(map(repr, missing))} (they have "
                          f"{', '.join(ds.column_names[:8])}); set prompt_field=/response_field=")
    if len(ds) == 0:
        raise ConfigError(f"{key}={spec!r} holds no records")
    for i, rec in enumerate(ds.select(range(min(len(ds), 1000)))):
        p, r = rec[prompt_field], rec[response_field]
        if not isinstance(p, str) or not isinstance(r, str) or not r.strip():
            raise ConfigError(f"{key}={spec!r}: record {i} has a non-string prompt or an empty response")
    ds = ds.select_columns([prompt_field, response_field])
    return ds.rename_columns({prompt_field: "prompt", response_field: "completion"}) \
        if (prompt_field, response_field) != ("prompt", "completion") else ds


def lora_config(model: torch.nn.Module, cfg: FinetuneConfig) -> Any:
    """Adapters on every projection: the factors A and B of a LowRankLinear, or a dense Linear."""
    from peft import LoraConfig

    from dlr.hf.lowrank import PROJECTIONS, LowRankLinear

    params, modules = set(), set()
    for name, m in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in PROJECTIONS:
            continue
        if isinstance(m, LowRankLinear):
            params |= {f"{short}.A.weight", f"{short}.B.weight"}
        elif isinstance(m, torch.nn.Linear):
            modules.add(short)
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_parameters=sorted(params) or None, target_modules=sorted(modules) or None,
                      task_type="CAUSAL_LM")


def _checkpoints(out_dir: Path) -> list[Path]:
    d = out_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def settings(cfg: FinetuneConfig) -> dict[str, Any]:
    """The settings as plain data (what config.yaml holds)."""
    return to_dict(cfg)


def _check_out_dir(out_dir: Path, cfg: FinetuneConfig) -> Path | None:
    """The checkpoint to resume from (None = start), after refusing a different config."""
    saved = out_dir / "config.yaml"
    resolved = {k: v for k, v in settings(cfg).items() if k not in RUNTIME_KEYS}
    if saved.is_file():
        before = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items()
                  if k not in RUNTIME_KEYS}
        diff = sorted(k for k in set(before) | set(resolved) if before.get(k) != resolved.get(k))
        if diff:
            raise ConfigError(f"out_dir={str(out_dir)!r} holds a fine-tuning run with a different config (differs in: "
                              f"{', '.join(diff[:8])}); accepted: the same config (to resume) or another out_dir")
    found = _checkpoints(out_dir)
    if found and cfg.resume == "never":
        raise ConfigError(f"resume='never' but out_dir={str(out_dir)!r} has checkpoints; accepted: resume=auto or another out_dir")
    return found[-1] if found else None


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _datasets(cfg: FinetuneConfig) -> tuple[Any, Any]:
    """(train, eval or None) in TRL's prompt-completion format."""
    fields = (cfg.prompt_field, cfg.response_field)
    train = load_pairs(cfg.train_data, cfg.train_split, *fields)
    if cfg.eval_data is None:
        return train, None
    return train, load_pairs(cfg.eval_data, cfg.eval_split, *fields, key="eval_data")


def _load(ckpt: Path, device: torch.device, verify: bool) -> tuple[torch.nn.Module, Any, Any]:
    """(model, dlr tokenizer, the directory's AutoTokenizer, which TRL tokenizes with)."""
    from transformers import AutoTokenizer

    from .artifacts.model_dir import load_model_dir

    model, tokenizer = load_model_dir(ckpt, device=device, verify=verify)
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:
        raise ConfigError(f"{str(ckpt)!r}: AutoTokenizer cannot load its tokenizer ({str(e).splitlines()[0][:160]}); "
                          "re-save it with dlr-fold or dlr.data.load_tokenizer(dir).save(dir)") from None
    return model, tokenizer, hf_tok


def _trainable(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """The model itself, or LoRA adapters on its projections (seeded: the adapters' init is random)."""
    model.train()
    if not cfg.lora:
        return model
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lora_config(model, cfg))


def _start_run_dir(out_dir: Path, cfg: FinetuneConfig, resume_from: Path | None) -> Path:
    """config.yaml written, a stale metrics.jsonl of an unresumed run dropped; returns metrics.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(settings(cfg), sort_keys=False))
    metrics_path = out_dir / "metrics.jsonl"
    if resume_from is None and metrics_path.exists():
        metrics_path.unlink()
    return metrics_path


def _metrics_callback(metrics_path: Path) -> Any:
    from transformers import TrainerCallback

    class _Metrics(TrainerCallback):
        """The Trainer's log records as JSON lines, like the pre-training run's metrics.jsonl."""

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and state.is_world_process_zero:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return _Metrics()


def _sft_config(cfg: FinetuneConfig, out_dir: Path, device: torch.device, bf16: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir / "checkpoints"), max_steps=cfg.steps, learning_rate=cfg.lr,
        lr_scheduler_type="cosine", warmup_steps=math.ceil(cfg.warmup_ratio * cfg.steps),
        weight_decay=cfg.weight_decay, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length, completion_only_loss=True, packing=False, seed=cfg.seed,
        data_seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_every,
        save_total_limit=cfg.keep_last, logging_steps=cfg.log_every, bf16=bf16,
        use_cpu=device.type == "cpu", report_to=["wandb"] if cfg.logger == "wandb" else [],
        disable_tqdm=not cfg.progress, dataloader_num_workers=0, eval_strategy="no",
    )


def _use_bf16(cfg: FinetuneConfig, device: torch.device) -> bool:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16 and device.type == "cpu":
        log.warning("precision=bf16 on the CPU: autocast bf16 is slow there")
    return bf16


def _train(trainer: Any, out_dir: Path, summary: dict[str, Any], resume_from: Path | None, evaluate: bool) -> None:
    """Train (resuming from `resume_from`), adding the losses to `summary`."""
    if evaluate:
        previous = _read_summary(out_dir)
        summary["eval_loss_before"] = previous.get("eval_loss_before") if resume_from is not None \
            else trainer.evaluate()["eval_loss"]
        _write_summary(out_dir, {**summary, "finished": False})  # a resumed run reports the same "before"
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    summary["train_loss"] = float(result.training_loss)
    if evaluate:
        summary["eval_loss_after"] = trainer.evaluate()["eval_loss"]


def _final_model(trained: torch.nn.Module, model: torch.nn.Module, *, lora: bool, n_params: int,
                 use_cache: bool) -> torch.nn.Module:
    """The fine-tuned model with the input's shape (LoRA merged back), ready to save."""
    final_model = trained.merge_and_unload() if lora else trained
    final_model.eval()
    final_model.config.use_cache = use_cache
    if _param_count(final_model) != n_params or type(final_model) is not type(model):
        raise RuntimeError(f"fine-tuning changed the model: {type(final_model).__name__} with "
                           f"{_param_count(final_model)} parameters, expected {n_params}")  # a bug, not bad input
    return final_model


def _provenance(ckpt: Path, cfg: FinetuneConfig, train_loss: float) -> dict[str, Any]:
    """dlr_checkpoint.json extras: the input's step, tokens and data, and what fine-tuned it. A
    local file or directory is named by its name only: the output holds no path of this machine."""
    from .artifacts.model_dir import read_meta

    meta = read_meta(ckpt).get("extra", {})
    data = cfg.train_data
    local = _is_local(data)
    tuned = {"data": Path(data).name if local else data, "steps": cfg.steps, "lora": cfg.lora,
             "train_loss": train_loss, **({} if local else {"dataset": data})}
    return {**{k: v for k, v in meta.items() if k in ("step", "tokens", "data", "dataset")},
            "finetuned_from": ckpt.resolve().name, "finetune": tuned}


def finetune(cfg: FinetuneConfig, callbacks: list | tuple = ()) -> dict[str, Any]:
    """Run (or resume) one fine-tuning job; returns the summary that is also written to disk.
    `cfg`: the fine-tuning settings (dlr.config.FinetuneConfig), read by attribute.
    `callbacks`: extra transformers TrainerCallbacks (e.g. early stopping, custom logging)."""
    from trl import SFTTrainer

    from dlr.device import pick_device
    from .artifacts.model_dir import describe, read_config, save_model_dir

    validate(cfg)
    ckpt = Path(cfg.ckpt).expanduser()
    config = read_config(ckpt)
    out_dir = out_dir_of(cfg, ckpt)
    resume_from = _check_out_dir(out_dir, cfg)
    train_ds, eval_ds = _datasets(cfg)
    device = pick_device(cfg.device, 0)
    bf16 = _use_bf16(cfg, device)
    model, tokenizer, hf_tok = _load(ckpt, device, cfg.verify)
    n_params = _param_count(model)
    use_cache = model.config.use_cache  # the Trainer turns the KV cache off for training
    trained = _trainable(model, cfg)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    metrics_path = _start_run_dir(out_dir, cfg, resume_from)
    trainer = SFTTrainer(model=trained, args=_sft_config(cfg, out_dir, device, bf16), train_dataset=train_ds,
                         eval_dataset=eval_ds, processing_class=hf_tok,
                         callbacks=[_metrics_callback(metrics_path), *callbacks])
    summary: dict[str, Any] = {"ckpt": str(ckpt.resolve()), "model": describe(config), "data": cfg.train_data,
                               "examples": len(train_ds), "steps": cfg.steps, "lora": cfg.lora,
                               "params": n_params, "trainable_params": trainable}
    _train(trainer, out_dir, summary, resume_from, evaluate=eval_ds is not None)
    final_model = _final_model(trained, model, lora=cfg.lora, n_params=n_params, use_cache=use_cache)
    save_model_dir(final_model, tokenizer, out_dir / "final", extra=_provenance(ckpt, cfg, summary["train_loss"]))
    summary["final"] = str((out_dir / "final").resolve())
    summary["finished"] = True
    _write_summary(out_dir, summary)
    return summary


def _write_summary(out_dir: Path, summary: dict) -> None:
    tmp = out_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / "summary.json")


def _read_summary(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
