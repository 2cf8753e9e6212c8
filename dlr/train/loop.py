"""The training loop: one code path for CPU, one GPU, many GPUs and nodes, DDP or FSDP2."""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..atomic import normalize_modes
from ..counting import model_stats
from ..data import check_vocab, data_spec, load_tokenizer, train_batches, validation_batches
from ..errors import ConfigError, TrainingDiverged
from ..evaluation import evaluate
from ..fold import fold_model
from ..loss import DEFAULT_CHUNK_TOKENS, make_loss_fn, resolve_loss_impl
from ..model import build_from_config, make_config
from ..training_paths import apply_training_paths
from ..optim import build_optimizer
from ..schema import TrainConfig, validate
from ..zoo import size_from_mapping
from .finite import last_finite_checkpoint, training_state_nonfinite
from .plan import TrainPlan, make_plan, memory_estimate_gib
from .preflight import check_data_files, check_out_dir, check_resume
from .rundir import KNOB_DEFAULTS, MetricsLog, RunLock, check_run_dir, finished_summary, tidy, write_config, write_summary
from .sharding import check_parallelism, clip_grad_norm, equal_batch_count, no_sync, save_final, shard_model
from .training_state import check_checkpoint, checkpoint_dirs, load_checkpoint, save_checkpoint
from .telemetry import peak_flops, peak_memory_gib

log = logging.getLogger("dlr.train")
__all__ = ["TrainingDiverged", "train"]


def _model_config(cfg: DictConfig, tokenizer):
    # The whole model node (not just its name), so model.hidden_size=... overrides apply.
    config = make_config(size_from_mapping(cfg.model), cfg.method, cfg.rank, cfg.alpha,
                         activation=cfg.activation, expand=cfg.expand, scope=cfg.scope, seed=cfg.seed,
                         vocab_size=tokenizer.vocab_size, **model_knobs(cfg))
    # The ids the data pipeline writes are the ids the model (and generate()) must use.
    config.pad_token_id, config.eos_token_id = tokenizer.pad_id, tokenizer.eos_id
    return config


def model_knobs(cfg: DictConfig) -> dict:
    """The reference layer's knobs (configs/train.yaml); absent keys (an older config) take the defaults."""
    return {k: cfg.get(k, v) for k, v in KNOB_DEFAULTS.items()}


def _precision(cfg: DictConfig) -> str:
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return "no" if cfg.precision == "fp32" else "bf16"


def _compile_enabled(cfg: DictConfig, device: torch.device) -> bool:
    """compile=auto: on for CUDA (2x+ the eager step, docs/benchmarks.md), off on CPU (compile time dominates)."""
    return device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile)


# Inductor options for a decoder whose layers are one nested_compile_region. On torch 2.13 a
# region that saves its input for backward hands that input back as an output aliasing it, and
# inductor's memory planner does not see the alias: once the input's last visible reader has run,
# its buffer is reused (allow_buffer_reuse) for a later tensor, e.g. the final norm's output,
# and the layer's backward reads garbage (wrong gradients, unchanged loss;
# scripts/repro_nested_compile_region.py). In-place updates (inplace_buffers) plan from the same
# liveness, and a region's backward inherits the outer graph's donated-input indices (fixed
# upstream by pytorch#193960), so both are off too: the caching allocator still recycles freed
# blocks, only the planner's reuse of dead buffers is given up.
REGION_INDUCTOR_OPTIONS = {"allow_buffer_reuse": False, "inplace_buffers": False}
_REGIONS: dict[type, type] = {}  # a layer class -> its region subclass, made once per class


def _layer_region(cls: type) -> type:
    """cls with its forward a nested_compile_region: traced and compiled once for all layers."""
    if cls in _REGIONS.values():
        return cls
    region = _REGIONS.get(cls)
    if region is None:
        # Same name, so class-name lookups (_no_split_modules, reprs) see the layer they know.
        region = _REGIONS[cls] = type(cls.__name__, (cls,), {
            "forward": torch.compiler.nested_compile_region(cls.forward), "__module__": cls.__module__})
    return region


def compile_decoder(model, region: bool = False) -> None:
    """The trainer's compilation: the whole decoder (embedding, mask, every layer, final norm)
    as one graph, in place; the loss stays outside (the chunked loss compiles its own chunk).
    Measured on an H200 (docs/benchmarks.md): per-layer graphs left the GPU idle 40% of a
    llama_60m step on host overhead, and transformers' mask code syncs with the host once per
    eager forward (traced away here); the loss inside a whole-model graph keeps bf16 logits.
    region (`compile_region=true`): the layer body is traced and compiled once, not once per
    layer (hierarchical compilation), so the first step's compile time does not grow with depth
    (CPU: llama_130m 67 -> 42 s). Off by default until its step time and memory are measured on
    a GPU: the region keeps inductor from fusing across layers and runs with REGION_INDUCTOR_OPTIONS.
    In place, so parameter names, state dicts, the fold and DDP wrapping are the eager model's.
    """
    if not region:
        model.model.compile()
        return
    for layer in model.model.layers:
        layer.__class__ = _layer_region(type(layer))
    model.model.compile(options=REGION_INDUCTOR_OPTIONS)


def compile_layers(model) -> None:
    """Regional compilation (each decoder layer; torchtitan's per-block compile), for comparison."""
    for layer in model.model.layers:
        layer.compile()


def compile_model(model) -> None:
    """Whole-model compilation, in place: one graph from the embedding to the loss, for comparison."""
    model.compile()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking: the copy overlaps the GPU's queue instead of stalling the host on it.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _fused_adamw(optimizer) -> torch.optim.Optimizer | None:
    """The torch AdamW behind accelerate's wrapper when it is fused (it then honours found_inf)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, torch.optim.Adam) and inner.defaults.get("fused") else None


def _memory_estimate(cfg: DictConfig, plan: TrainPlan, config, stats, parallelism: str) -> dict:
    # A plan for several processes is a GPU plan: bf16 there, unless fp32 is asked for.
    on_gpu = torch.cuda.is_available() or plan.processes > 1
    bf16 = _precision(cfg) == "bf16" or (plan.processes > 1 and cfg.precision != "fp32")
    loss = cfg.get("loss", "plain")
    compiled_loss = loss == "liger" or _compile_enabled(cfg, torch.device("cuda" if on_gpu else "cpu"))
    memory = memory_estimate_gib(stats, plan, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                                 config.vocab_size, bf16=bf16, gradient_checkpointing=cfg.gradient_checkpointing,
                                 parallelism=parallelism, optimizer_bytes_per_param=8,
                                 fused_loss=loss != "plain", loss_chunk_tokens=DEFAULT_CHUNK_TOKENS,
                                 compiled_loss=compiled_loss)
    return {k: round(v, 2) for k, v in memory.items()}


def describe_plan(cfg: DictConfig, plan: TrainPlan, config) -> dict:
    """What dry_run prints: built on `meta`, so it works for llama_7b on a laptop."""
    train_model = build_from_config(config, device="meta")
    knobs = model_knobs(cfg)
    # A DLR model deploys folded: no residual, alpha or latent scale; the bias stays.
    deploy_knobs = {"bias": knobs["bias"]} if cfg.method == "dlr" else knobs
    deploy_config = make_config(config.dlr_size, "lowrank" if cfg.method == "dlr" else cfg.method, cfg.rank,
                                activation=cfg.activation, vocab_size=config.vocab_size, **deploy_knobs)
    train_stats = model_stats(train_model, plan.seq_len)
    deploy_stats = model_stats(build_from_config(deploy_config, device="meta"), plan.seq_len)
    memory = {p: _memory_estimate(cfg, plan, config, train_stats, p) for p in ("ddp", "fsdp2")}
    return {
        "model": config.dlr_size, "method": cfg.method, "rank": config.dlr_rank, "alpha": cfg.alpha,
        "train_params": train_stats.total_params, "train_non_embedding_params": train_stats.non_embedding_params,
        "deploy_params": deploy_stats.total_params, "deploy_non_embedding_params": deploy_stats.non_embedding_params,
        "forward_flops_per_token": train_stats.forward_flops_per_token,
        "train_flops_per_token": train_stats.train_flops_per_token,
        "total_train_flops": train_stats.train_flops_per_token * plan.total_tokens,
        **plan.as_dict(),
        "parallelism": cfg.parallelism,
        "memory_estimate_per_process_gib": memory[cfg.parallelism],
        "memory_estimate_per_process_gib_by_parallelism": memory,
        "out_dir": cfg.out_dir,
    }


def _resume_point(cfg: DictConfig, out_dir: Path) -> Path | None:
    existing = checkpoint_dirs(out_dir)
    if cfg.resume == "auto":
        return existing[-1] if existing else None
    if cfg.resume == "never":
        if existing:
            raise ConfigError(f"resume='never' but out_dir={str(out_dir)!r} has checkpoints; accepted: resume=auto or another out_dir")
        return None
    return check_resume(cfg.resume)


def _data_state(data, accelerator, device) -> dict:
    """This process's data position, and the whole run's in process-count-independent terms."""
    mine = torch.tensor(data.local_position(), dtype=torch.long, device=device)
    positions = accelerator.gather(mine).view(-1, mine.numel()).tolist()
    return {"process": data.state_dict(), "global": data.global_state(positions)}


def train(cfg: DictConfig) -> dict:
    """Run (or dry-run) one training job described by the resolved Hydra config.

    Everything that can be wrong with the input is refused (ConfigError, one line) before
    the run directory is touched: the schema, the model/optimizer/plan combination, the
    resume value, out_dir, and every data file. A finished run (resume=auto) is returned
    as it is, with "already_finished": True, and nothing is written.
    """
    validate(TrainConfig, cfg)
    spec = data_spec(cfg.data)
    tokenizer = load_tokenizer(spec.tokenizer)
    config = _model_config(cfg, tokenizer)
    check_vocab(tokenizer, config.vocab_size)
    parallelism = check_parallelism(cfg)
    # Method/optimizer combinations (e.g. spectron on a full model) on a meta copy: no memory.
    build_optimizer(cfg.optimizer, build_from_config(config, device="meta"), cfg.method)
    check_resume(cfg.resume)
    if cfg.dry_run:
        processes = cfg.plan_processes or 1
        return describe_plan(cfg, make_plan(cfg, processes, spec.seq_len), config)

    mixed = _precision(cfg)
    # cpu=True is what makes accelerate pick gloo for a torchrun-launched CPU job. Under FSDP2
    # the sharding's MixedPrecisionPolicy casts for compute, so accelerate's autocast stays off.
    accelerator = Accelerator(mixed_precision=mixed if parallelism == "ddp" else "no", cpu=not torch.cuda.is_available(),
                              log_with="wandb" if cfg.logger == "wandb" else None)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("accelerate's own FSDP (distributed_type: FSDP in the accelerate config) is not used by dlr-train; "
                          "accepted: distributed_type MULTI_GPU with parallelism=fsdp2 (configs/accelerate/fsdp2.yaml)")
    plan = make_plan(cfg, accelerator.num_processes, spec.seq_len)
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_run_dir(out_dir, resolved)
    done = finished_summary(out_dir) if cfg.resume == "auto" else None
    if done is not None:
        log.info("%s has finished; nothing to do (resume=auto leaves a finished run as it is)", out_dir)
        return {**done, "already_finished": True}
    resume_from = _resume_point(cfg, out_dir)
    if resume_from is not None:
        check_checkpoint(resume_from)  # a corrupt or old-format checkpoint: one line, before any work
    check_data_files(spec)

    lock = RunLock(out_dir)
    if accelerator.is_main_process:
        lock.acquire()
        tidy(out_dir)
    try:
        result = _run(cfg, spec, tokenizer, config, accelerator, plan, mixed, out_dir, resolved, resume_from)
    except ConfigError:
        lock.release(remove_dir_if_empty=True)
        raise
    finally:
        lock.release()
    return result


def _run(cfg, spec, tokenizer, config, accelerator, plan, mixed, out_dir, resolved, resume_from) -> dict:
    """Train from the start or `resume_from` to the end of the plan, then _finish; holds the run lock."""
    parallelism = cfg.parallelism  # checked by train() (check_parallelism)
    set_seed(cfg.seed)  # identical init on every process
    model = build_from_config(config)
    apply_training_paths(model)
    stats = model_stats(model, plan.seq_len)
    if cfg.gradient_checkpointing:
        # transformers 5.x renamed it (the old name warns and goes away in v6); 4.x has only the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = _compile_enabled(cfg, accelerator.device)
    device = accelerator.device
    loss_impl = resolve_loss_impl(cfg.loss, device)
    model.fused_loss = make_loss_fn(loss_impl, compiled=compiled)
    if compiled:
        # FSDP2's units are the decoder layers: each is compiled in place before it is sharded
        # (torchtitan's order); a whole-decoder graph would have to trace FSDP2's hooks.
        if parallelism == "fsdp2":
            compile_layers(model)
        else:
            compile_decoder(model, region=bool(cfg.get("compile_region", False)))
    if parallelism == "fsdp2":  # before the optimizer: it must hold the sharded parameters
        model = shard_model(model, device, bf16=mixed == "bf16")
    # Fused AdamW on CUDA: one kernel for all parameters, and it can refuse a whole update on
    # the device (found_inf) without a host sync. The CPU keeps the foreach kernel (its numbers).
    optimizer = build_optimizer(cfg.optimizer, model, cfg.method, fused=device.type == "cuda")
    # Not passed to prepare(): accelerate would step it once per process per step.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, plan.warmup_steps, plan.steps, min_lr_rate=cfg.min_lr_ratio)
    if parallelism == "ddp":
        model, optimizer = accelerator.prepare(model, optimizer)
    # Under FSDP2 the MixedPrecisionPolicy computes in bf16; autocast stays off.
    autocast_dtype = torch.bfloat16 if mixed == "bf16" and parallelism == "ddp" else None

    data = train_batches(spec, tokenizer, plan.micro_batch, accelerator.process_index, accelerator.num_processes, cfg.seed)
    val = validation_batches(spec, tokenizer, plan.micro_batch, accelerator.process_index, accelerator.num_processes)
    if parallelism == "fsdp2":
        val = equal_batch_count(val, device)
    # Written only now: bad input found while building the model, optimizer or data above
    # must leave no run directory behind (it would then refuse the corrected config).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_config(out_dir, cfg)
    step, wall_before, wandb_id = 0, 0.0, None
    if resume_from is not None:
        trainer_state, data_state = load_checkpoint(accelerator, resume_from, model, optimizer, scheduler)
        # Its own exact position when the processes are the same; else the global position.
        data.restore(data_state["process"], data_state["global"])
        step, wall_before, wandb_id = trainer_state["step"], trainer_state["wall_s"], trainer_state.get("wandb_id")
        log.info("resumed from %s at step %d", resume_from, step)
    if cfg.logger == "wandb":
        # Our own id (wandb's generator moved between releases), kept in every checkpoint so
        # a resumed run continues the same wandb run.
        wandb_id = wandb_id or uuid.uuid4().hex[:8]
        accelerator.init_trackers(cfg.wandb.project, config=resolved, init_kwargs={"wandb": {
            "name": cfg.wandb.name or out_dir.name, "id": wandb_id, "resume": "allow", "entity": cfg.wandb.entity,
            "dir": str(out_dir), **({"mode": cfg.wandb.mode} if cfg.wandb.mode else {})}})
    metrics = MetricsLog(out_dir / "metrics.jsonl", accelerator.is_main_process, start_step=step)

    def run_eval(at_step: int, eval_model=None, prefix: str = "val") -> dict:
        # The plain module: evaluation needs no DDP hooks, and a compiled graph would
        # recompile for no-grad mode and every new batch shape.
        eval_model = eval_model or accelerator.unwrap_model(model, keep_torch_compile=False)
        result = evaluate(eval_model, val, device, dtype=autocast_dtype, compiled_loss=compiled)
        record = {"step": at_step, "tokens": at_step * plan.tokens_per_step, f"{prefix}_loss": result["val_loss"],
                  f"{prefix}_ppl": result["val_ppl"], f"{prefix}_tokens": result["val_tokens"]}
        metrics.write(record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=at_step)
        if accelerator.is_main_process:
            tqdm.write(f"step {at_step}: {prefix}_loss {result['val_loss']:.4f} {prefix}_ppl {result['val_ppl']:.2f} ({result['val_tokens']} tokens)")
        return result

    def checkpoint(at_step: int, wall: float) -> None:
        # Never a checkpoint with NaN/inf in it: resume=auto would fail on it again. (DDP: the
        # whole model is local; FSDP2 shards are left to the step's own refusal.)
        bad = training_state_nonfinite(accelerator.unwrap_model(model, keep_torch_compile=False), optimizer) \
            if cfg.parallelism == "ddp" else []
        if bad:
            good = last_finite_checkpoint(checkpoint_dirs(out_dir))
            raise TrainingDiverged(
                f"non-finite weights or optimizer state at step {at_step} ({len(bad)} tensors, e.g. {bad[0]}); "
                f"not saved. Last finite checkpoint: {good or 'none'} (try a lower lr={cfg.lr})")
        saved = save_checkpoint(accelerator, out_dir, at_step, model, optimizer, scheduler,
                                _data_state(data, accelerator, device),
                                {"step": at_step, "tokens": at_step * plan.tokens_per_step, "wall_s": wall,
                                 "wandb_id": wandb_id}, cfg.keep_last)
        if accelerator.is_main_process:
            normalize_modes(saved)  # safetensors writes 0600; every file of a run gets one mode

    peak = peak_flops(device)
    progress = tqdm(total=plan.steps, initial=step, disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True)
    fused_adamw = _fused_adamw(optimizer)
    # First step whose update was refused for a non-finite loss or gradient (0: none). Kept on
    # the device and read at log/eval/save points only: no per-step host sync.
    refused_at = torch.zeros((), dtype=torch.long, device=device)
    speed = _Throughput(plan.tokens_per_step, device)
    t_start = time.perf_counter()
    last_eval, first_step_in_log = None, True

    def check_finite(at_step: int) -> None:
        bad = int(refused_at) if fused_adamw is not None else 0
        if bad:
            raise TrainingDiverged(_diverged_message(out_dir, bad, at_step, cfg.lr))

    while step < plan.steps:
        micro = [next(data) for _ in range(plan.grad_accum)]
        # Token-weighted loss over the whole global batch: the same number whatever the
        # split into processes and micro-batches (HF divides the summed CE by this count).
        # Counted on the host (the labels are still there), summed on the device.
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        n_tokens = accelerator.reduce(_to_device(torch.tensor(local_tokens, dtype=torch.long), device), "sum")
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            sync = no_sync(accelerator, model, skip=i < len(micro) - 1)
            with sync, accelerator.autocast():
                out = model(input_ids=_to_device(batch["input_ids"], device), labels=_to_device(batch["labels"], device),
                            num_items_in_batch=n_tokens)
                # DDP averages gradients over processes; undo that, the count is global.
                accelerator.backward(out.loss * accelerator.num_processes)
            loss_sum += out.loss.detach().float()
        grad_norm = clip_grad_norm(accelerator, model, cfg.grad_clip)
        step += 1
        # A non-finite loss anywhere makes every process's gradient (all-reduced) non-finite.
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        if fused_adamw is not None:
            fused_adamw.found_inf = (~finite).float()  # the kernel then leaves weights and moments alone
            refused_at = torch.where((refused_at == 0) & ~finite, step, refused_at)
        elif not bool(finite):  # no fused kernel (CPU, Spectron): refuse on the host before the update
            raise TrainingDiverged(_diverged_message(out_dir, step, step, cfg.lr))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        if speed.step_done() and accelerator.is_main_process:
            tqdm.write(f"first step (compile + warm-up): {speed.first_step_s:.1f} s, kept out of tokens/s")
        if step % cfg.log_every == 0 or step == plan.steps:
            check_finite(step)
            loss = accelerator.reduce(loss_sum, "sum").item()  # the one host sync per log interval
            tok_s = speed.window_tokens_per_s()
            record = {"step": step, "tokens": step * plan.tokens_per_step, "loss": loss,
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s, "grad_norm": float(grad_norm),
                      "peak_mem_gib": peak_memory_gib(device)}
            if first_step_in_log:
                record["first_step_s"], first_step_in_log = speed.first_step_s, False
            if peak and tok_s:
                record["mfu"] = tok_s * stats.train_flops_per_token / (peak * accelerator.num_processes)
            metrics.write(record)
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                 tok_s=f"{tok_s:,.0f}" if tok_s else "-")
            speed.new_window()
        if step % cfg.eval_every == 0 or step == plan.steps:
            check_finite(step)
            with speed.paused():
                last_eval = run_eval(step)
        if step % cfg.save_every == 0 or step == plan.steps:
            check_finite(step)
            with speed.paused():
                checkpoint(step, wall_before + time.perf_counter() - t_start)
    progress.close()
    data.close()

    if last_eval is None:  # resumed from the final checkpoint: evaluate what we have
        last_eval = run_eval(step)
    return _finish(cfg, accelerator, model, tokenizer, stats, plan, run_eval, last_eval,
                   wall_before + time.perf_counter() - t_start, speed, loss_impl, compiled,
                   memory_estimate=_memory_estimate(cfg, plan, config, stats, parallelism))


def _diverged_message(out_dir: Path, bad_step: int, at_step: int, lr: float) -> str:
    good = last_finite_checkpoint(checkpoint_dirs(out_dir))  # named only once read back and checked
    where = f"at step {bad_step}" + (f" (found at step {at_step})" if at_step != bad_step else "")
    return (f"loss or gradient is not finite {where}; that update was refused, so the weights stay finite; stopped. "
            f"Last finite checkpoint: {good or 'none'} (try a lower lr={lr})")


class _Throughput:
    """Training tokens/s from host clocks read only after a sync, evaluation and saves left out.

    Without per-step syncs the host runs ahead of the GPU, so one step's wall time means
    nothing; a window between two log points (each read after a sync) does. The first step of
    a process (compilation, warm-up) is timed once on its own and kept out of tokens/s.
    """

    def __init__(self, tokens_per_step: int, device: torch.device) -> None:
        self.tokens_per_step, self.device = tokens_per_step, device
        self.first_step_s: float | None = None
        self.timed_s, self.timed_steps = 0.0, 0
        self._timed_in_window = 0
        self._window_t0, self._excluded = time.perf_counter(), 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_done(self) -> bool:
        """Count a finished step; True for the first one, which is timed (after a sync) on its own."""
        if self.first_step_s is None:
            self._sync()
            now = time.perf_counter()
            self.first_step_s = now - self._window_t0 - self._excluded
            self._window_t0, self._excluded = now, 0.0
            return True
        self._timed_in_window += 1
        return False

    def window_tokens_per_s(self) -> float | None:
        """Tokens/s of the timed steps since the last window; syncs first."""
        self._sync()
        elapsed = time.perf_counter() - self._window_t0 - self._excluded
        if self._timed_in_window == 0 or elapsed <= 0:
            return None
        self.timed_s += elapsed
        self.timed_steps += self._timed_in_window
        return self._timed_in_window * self.tokens_per_step / elapsed

    def new_window(self) -> None:
        self._timed_in_window = 0
        self._window_t0, self._excluded = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._excluded += time.perf_counter() - t

    def mean_tokens_per_s(self) -> float | None:
        return self.timed_steps * self.tokens_per_step / self.timed_s if self.timed_s > 0 else None


def _finish(cfg, accelerator, model, tokenizer, stats, plan, run_eval, last_eval, wall, speed, loss_impl, compiled,
            memory_estimate: dict | None = None) -> dict:
    """Write final/ (and folded/ for dlr, with its perplexity) and summary.json.

    Under FSDP2 the model stays sharded throughout: evaluation runs sharded, the fold works on
    each process's rows of B, and final/ and folded/ are streamed from the shards.
    """
    out_dir = Path(cfg.out_dir)
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # What docs/checkpoints.md promises in dlr_checkpoint.json: where in training this model is.
    extra = {"step": plan.steps, "tokens": plan.total_tokens, "val_loss": last_eval["val_loss"],
             "val_tokens": last_eval["val_tokens"]}
    save_final(unwrapped, tokenizer, out_dir / "final", accelerator.is_main_process, extra=extra)
    summary = {
        "model": unwrapped.config.dlr_size, "method": cfg.method, "rank": unwrapped.config.dlr_rank,
        "alpha": cfg.alpha, "seed": cfg.seed, "optimizer": cfg.optimizer.name, "steps": plan.steps,
        "tokens": plan.total_tokens, "processes": plan.processes,
        "val_loss": last_eval["val_loss"], "val_ppl": last_eval["val_ppl"], "val_tokens": last_eval["val_tokens"],
        "train_params": stats.total_params, "train_non_embedding_params": stats.non_embedding_params,
        "deploy_params": stats.total_params, "train_flops_per_token": stats.train_flops_per_token,
        "wall_s": wall, "mean_tokens_per_s": speed.mean_tokens_per_s(), "first_step_s": speed.first_step_s,
        "compile": compiled, "loss_impl": loss_impl, "fuse_latents": bool(cfg.get("fuse_latents", False)),
        "compile_region": bool(compiled and cfg.get("compile_region", False)),
        "peak_mem_gib": peak_memory_gib(device),
        "parallelism": cfg.parallelism, "memory_estimate_per_process_gib": memory_estimate,
    }
    accelerator.wait_for_everyone()
    if cfg.method == "dlr":
        folded = fold_model(unwrapped)
        folded_eval = run_eval(plan.steps, eval_model=unwrapped, prefix="folded_val")
        deploy = model_stats(unwrapped, plan.seq_len)
        summary.update({"folded_layers": folded, "folded_val_loss": folded_eval["val_loss"],
                        "folded_val_ppl": folded_eval["val_ppl"], "deploy_params": deploy.total_params,
                        "deploy_non_embedding_params": deploy.non_embedding_params,
                        "fold_rel_ppl_diff": abs(folded_eval["val_ppl"] - last_eval["val_ppl"]) / last_eval["val_ppl"]})
        save_final(unwrapped, tokenizer, out_dir / "folded", accelerator.is_main_process,
                   extra={**extra, "val_loss": folded_eval["val_loss"], "folded_from": str(out_dir / "final")})
    if accelerator.is_main_process:
        write_summary(out_dir, summary)
        tidy(out_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
