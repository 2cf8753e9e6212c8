"""Data parallelism: DDP (through accelerate) or FSDP2 (`fully_shard`, driven here).

accelerate turns FSDP on only for GPU jobs, so that the same FSDP2 code runs on CPU (gloo)
in the test suite and on GPUs (nccl), the model is sharded here; the Accelerator still owns
the process group, the device and the reductions, so the training loop has one code path.

Layout (as torchtitan): one FSDP unit per decoder layer, one for the embeddings, and the
root: the training objective (dlr.train.objective) with the final norm and lm_head, which the
fused loss reads inside the root's forward. Parameters stay fp32; on bf16 runs the
MixedPrecisionPolicy gathers them in bf16 for compute and reduces gradients in fp32
(accelerate's autocast is then off: the policy does that job).
"""
from __future__ import annotations

import contextlib
import os
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


def shard_model(objective: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """fully_shard per decoder layer, the embeddings and the root, in place: the training
    objective (dlr.train.objective) with the final norm and lm_head; the model it trains keeps
    its class, so it saves as itself."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    objective.to(device)
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
    decoder = objective.model
    tied = objective.lm_head.weight is decoder.get_input_embeddings().weight
    if not tied:  # a tied pair must live in one unit: the root
        fully_shard(decoder.get_input_embeddings(), **kw)
    for layer in decoder.layers:
        fully_shard(layer, **kw)
    # lm_head stays in the root unit (with the final norm): the fused loss (dlr.model.fused_loss) reads
    # lm_head.weight inside the root's forward without calling lm_head, so lm_head's own
    # unit would never be gathered; the root's is, for the whole forward and backward.
    fully_shard(objective, **kw)
    return objective


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


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model on the main process's CPU ({} on the others);
    every process must call it (each tensor is gathered from all of them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tensor gathered from padded shards (a dimension the processes do not divide evenly, a
    # one-element parameter) can be a view of a larger buffer; the shard plan counts storage
    # bytes (model.safetensors.index.json's total_size), so each gets a buffer of its own size.
    return {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in state.items()}


def save_final(model, tokenizer, out_dir: str | os.PathLike, is_main: bool, extra: dict | None = None) -> None:
    """final/ and folded/, written by the main process; every process calls it. Under FSDP2 the
    weights are gathered first (one whole copy in the main process's host memory), then written
    as a single process writes them. `extra` goes into dlr_checkpoint.json (step, tokens, val loss)."""
    from ..artifacts.model_dir import save_model_dir

    sharded = is_sharded(model)
    state_dict = gathered_state_dict(model) if sharded else None
    if is_main:
        save_model_dir(model, tokenizer, out_dir, extra=extra, state_dict=state_dict)
    if sharded and dist.is_initialized():
        dist.barrier()
