"""Data parallelism: DDP (through accelerate) or FSDP2 (`fully_shard`, driven here).

accelerate turns FSDP on only for GPU jobs, so that the same FSDP2 code runs on CPU (gloo)
in the test suite and on GPUs (nccl), the model is sharded here; the Accelerator still owns
the process group, the device and the reductions, so the training loop has one code path.

Layout (as torchtitan): one FSDP unit per decoder layer, one for the embeddings, and the
root (final norm and lm_head, which the fused loss reads inside the root's forward). Parameters stay fp32; on bf16 runs the
MixedPrecisionPolicy gathers them in bf16 for compute and reduces gradients in fp32
(accelerate's autocast is then off: the policy does that job).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config.methods import KNOBS
from ..errors import ConfigError
from ..optim.build import BUILDERS
from ..config import TrainConfig


def check_parallelism(cfg: TrainConfig) -> str:
    value = cfg.system.parallelism  # one of PARALLELISMS (dlr.config.SystemConfig)
    name = cfg.optimizer.name
    if value == "fsdp2" and not BUILDERS[name].fsdp2:
        # Spectron's Newton-Schulz and power iteration need each factor whole; FSDP2 shards its rows.
        raise ConfigError(f"optimizer={name} is not supported with parallelism='fsdp2' (it needs whole factors); "
                          f"accepted: optimizer=adamw with fsdp2, or {name} with parallelism=ddp")
    if value == "fsdp2":
        for key in (k for k in KNOBS if k.startswith("trainable_")):  # each adds a per-layer Parameter
            if getattr(cfg.factorization, key):
                # Folding it removes a per-layer Parameter that FSDP2 keeps in its group and would
                # register again (and apply again) at the next gather, e.g. the folded evaluation.
                raise ConfigError(f"{key}=true is not supported with parallelism='fsdp2' (its fold removes a parameter "
                                  f"FSDP2 manages); accepted: {key}=false with fsdp2, or parallelism=ddp")
    return value


def ensure_process_group(device: torch.device) -> None:
    """fully_shard needs a process group; a plain single process gets a one-member one."""
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """fully_shard per decoder layer, the embeddings and the root (norm, lm_head), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    model.to(device)
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if not tied:  # a tied pair must live in one unit: the root
        fully_shard(model.get_input_embeddings(), **kw)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    # lm_head stays in the root unit (with the final norm): the fused loss (dlr.model.fused_loss) reads
    # lm_head.weight inside the model's forward without calling lm_head, so lm_head's own
    # unit would never be gathered; the root's is, for the whole forward and backward.
    fully_shard(model, **kw)
    return model


def no_sync(accelerator, model: torch.nn.Module, skip: bool):
    """Skip the gradient reduction of a micro-batch that is not the last of its step."""
    if not skip:
        return contextlib.nullcontext()
    target = getattr(model, "_orig_mod", model)
    if hasattr(target, "set_requires_gradient_sync"):  # FSDP2: accumulate unsharded grads locally
        @contextlib.contextmanager
        def _fsdp():
            target.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                target.set_requires_gradient_sync(True)
        return _fsdp()
    return accelerator.no_sync(model)


def clip_grad_norm(accelerator, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm`; the total norm as a plain tensor (FSDP2's is a replicated DTensor)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def equal_batch_count(batches: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Pad this process's evaluation batches to the largest count over processes.

    Under FSDP2 every forward is a collective, so every process must run as many; the padding
    batch is one row of ignored labels (-100), which adds nothing to the loss or the count.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1 or not batches:
        return batches
    n = torch.tensor([len(batches)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    pad_ids = torch.zeros_like(batches[0]["input_ids"][:1])
    filler = {"input_ids": pad_ids, "labels": torch.full_like(pad_ids, -100)}
    return batches + [filler] * (int(n.item()) - len(batches))


def _full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (every process must call this for a DTensor: it gathers)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().cpu().contiguous()


@contextlib.contextmanager
def _unsharded_class(model):
    """fully_shard swaps the model's class for a dynamic `FSDP<Name>` subclass defined in torch;
    save_pretrained would copy torch's files as the model's remote code. Show it the real class."""
    from torch.distributed.fsdp import FSDPModule

    sharded_cls = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(c for c in sharded_cls.__bases__ if not issubclass(c, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = sharded_cls


def save_model_dir_gathered(model, tokenizer, out_dir: str | os.PathLike, is_main: bool, extra: dict | None = None,
                            max_shard_size: str | int | None = None) -> Path:
    """`save_model_dir` for a sharded model; every process calls it, the main one writes.

    The weights are gathered one tensor at a time and written one safetensors shard at a
    time, split exactly as `save_pretrained` splits them, so the main process holds at most
    one shard (2 GB) and the files are byte-identical to a single-process save.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from ..artifacts.model_dir import INDEX_FILE, MAX_SHARD_SIZE, atomic_dir, finish_model_dir, save_pretrained_quietly

    max_shard_size = max_shard_size or MAX_SHARD_SIZE
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    # The shard plan needs only shapes and dtypes: meta stand-ins, keyed like the real ones.
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    meta = remove_tied_weights_from_state_dict(meta, model)
    plan = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                              max_shard_size=max_shard_size)
    context = atomic_dir(out_dir) if is_main else contextlib.nullcontext(None)
    with context as tmp:
        if is_main:
            with _unsharded_class(model):  # config, generation config, remote code: no weights
                save_pretrained_quietly(model, tmp, state_dict={})
        for filename, names in plan.filename_to_tensors.items():
            shard = {name: _full(state[name]) for name in names}
            if is_main:
                save_file(shard, tmp / filename, metadata={"format": "pt"})
            del shard
        if is_main:
            if plan.is_sharded:
                index = {"metadata": {"total_parameters": model.num_parameters(), **plan.metadata},
                         "weight_map": plan.tensor_to_filename}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            finish_model_dir(tmp, extra, tokenizer=tokenizer)
    if dist.is_initialized():
        dist.barrier()
    return Path(out_dir).expanduser().absolute()


def save_final(model, tokenizer, out_dir: str | os.PathLike, is_main: bool, extra: dict | None = None) -> None:
    """final/ and folded/: streamed from the shards under FSDP2, from the main process under DDP.
    `extra` goes into dlr_checkpoint.json (the trainer's step, tokens, val loss)."""
    from ..artifacts.model_dir import save_model_dir

    if is_sharded(model):
        save_model_dir_gathered(model, tokenizer, out_dir, is_main, extra=extra)
    elif is_main:
        save_model_dir(model, tokenizer, out_dir, extra=extra)
