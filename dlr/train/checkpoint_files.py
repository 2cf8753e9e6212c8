"""Training-state checkpoints: sharded, resharded on load, pickle-free, written atomically.

Layout of checkpoints/step_<N>/:

    state/shard-0000r-model-00001-of-00001.safetensors   model + optimizer tensors, one file per
                                                          process (its shards, with their offsets)
    optimizer.json      param_groups and non-tensor optimizer state (names, not pickles)
    scheduler.json      the LR scheduler's state_dict
    data.json           the data position: per process, and in process-count-independent terms
    rng_<rank>.safetensors  torch/cuda/numpy/python RNG state of each process
    trainer_state.json  step, tokens, wall time, wandb id, the last evaluation, the number of
                        metrics.jsonl lines so far, processes, the run's settings (`config`, what
                        config.yaml holds), the size and sha256 of every other file (`files`),
                        format_version (written last, by the main process)

Why torch.distributed.checkpoint with its Hugging Face safetensors storage: every process
writes only the shards it holds (host memory stays bounded for 7B under FSDP2), the files
carry their offsets in the safetensors header, and the reader reslices them for whatever
layout the loading run has, so a checkpoint of 2 processes loads into 1 or 4. DCP's default
FileSystemReader would unpickle its `.metadata`; the Hugging Face reader builds the metadata
from the safetensors headers instead, so nothing in a checkpoint is ever unpickled.

A directory named step_<N> is complete by construction: it is assembled under
`.tmp_step_<N>` and renamed by the main process after every process has written its part.
A failed write (a full disk) removes the temporary directory on every process and leaves the
previous checkpoints as they were. A resume checks every file's size, and with verify=true its
sha256, against `files` before reading a tensor: a flipped bit is refused, not trained on.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..artifacts.run_dir import CHECKPOINTS_DIR

_STEP_DIR = re.compile(r"^step_(\d+)$")
# 5: the run's settings and every file's size and sha256 in trainer_state.json; the factors as
# nn.Linear modules (state-dict names <proj>.A.weight, ...).
FORMAT_VERSION = 5
# What a resume reads from trainer_state.json (dlr.train.checkpointing.restore).
TRAINER_STATE_KEYS = ("step", "tokens", "wall_s", "wandb_id", "last_eval", "metrics_lines", "processes", "config",
                      "files")
TRAINER_STATE = "trainer_state.json"
STATE_DIR = "state"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module the optimizer's parameters belong to: no DDP wrapper, no torch.compile."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# --------------------------------------------------------------------------- RNG


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    kind, mt, _ = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(mt, dtype=torch.int64),
               "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors, {"python_version": str(kind), "numpy_pos": str(int(np_state[2]))}


def _set_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    random.setstate((int(meta["python_version"]), tuple(int(x) for x in tensors["python"].tolist()), None))
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"]), 0, 0.0))
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# --------------------------------------------------------------------------- model + optimizer


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state keyed by parameter names; DTensor shards stay sharded."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(plain_module(model), optimizer)


def _split_optimizer(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (to safetensors) and everything else (to JSON) of a name-keyed optimizer state."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for fqn, entry in optim_sd["state"].items():
        layout[fqn] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{fqn}.{key}"] = value
                layout[fqn][key] = {"tensor": f"optim.{fqn}.{key}"}
            else:
                layout[fqn][key] = {"value": value}
    return tensors, {"state": layout, "param_groups": optim_sd["param_groups"]}


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default))


# --------------------------------------------------------------------------- save


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_ok(ok: bool) -> bool:
    if not _distributed():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _causes(err: BaseException) -> list[BaseException]:
    """err, what it wraps (DCP's CheckpointException holds one exception per process), and causes."""
    seen, todo, out = set(), [err], []
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [w[0] for w in getattr(e, "failures", {}).values()]  # (exception, traceback) per process
        todo += [e.__cause__, e.__context__]
    return out


def _describe_write_error(err: BaseException) -> str:
    for e in _causes(err):  # the OSError says what happened (no space, permission, ...)
        if isinstance(e, OSError) and e.errno is not None:
            return e.strerror or errno.errorcode.get(e.errno, str(e.errno))
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    causes = _causes(err)
    first = causes[1] if getattr(err, "failures", None) and len(causes) > 1 else err  # a process's own error
    text = str(first).strip()
    return (text.splitlines()[-1] if text else type(first).__name__)[:200]


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it "assumes" a single process when there is no process group; we mean it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _sha256(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_records(tmp: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file every process wrote into `tmp`.

    hashlib releases the GIL, so the files (one state shard per process) hash in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_sha256, files))
    return {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": d} for f, d in zip(files, digests)}


def _write_parts(tmp: Path, accelerator, tensors: dict, optim_json: dict, scheduler, data_state: dict) -> None:
    """This process's part of a checkpoint: its tensor shards, RNG and data position (and, on
    the main process, the optimizer layout, the schedule and the global data position)."""
    import torch.distributed.checkpoint as dcp

    rank = accelerator.process_index
    # Every process writes its own shards (replicated tensors once, spread over processes);
    # DCP gathers a failure on any process into an exception on all of them.
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / STATE_DIR), save_distributed=True),
                 no_dist=not _distributed())
    rng, rng_meta = _rng_tensors()
    save_file(rng, tmp / f"rng_{rank}.safetensors", metadata=rng_meta)
    _write_json(tmp / f"data_{rank}.json", data_state["process"])
    if accelerator.is_main_process:
        _write_json(tmp / "optimizer.json", optim_json)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "data.json", data_state["global"])


def _attempt(error: BaseException | None, write) -> BaseException | None:
    """The first failure of a checkpoint write: `error`, else what write() raises (None if it works)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if error is not None:
        return error
    try:
        write()
    # Any failure: clean up on every process, then one line. (DCP's CheckpointException is a
    # BaseException, not an Exception.)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        return e
    return None


def save_checkpoint(accelerator, out_dir: Path, step: int, *, model, optimizer, scheduler,
                    data_state: dict, trainer_state: dict, keep_last: int) -> Path:
    """Write checkpoints/step_<step> from every process; ConfigError (one line) if it cannot.

    `trainer_state` holds the run's settings under "config"; the main process adds the size and
    sha256 of every file once all processes have written theirs."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    main = accelerator.is_main_process
    model_sd, optim_sd = _state_dicts(model, optimizer)
    optim_tensors, optim_json = _split_optimizer(optim_sd)
    tensors = {**{f"model.{k}": v for k, v in model_sd.items()}, **optim_tensors}
    error = _attempt(None, lambda: _fresh_dir(tmp) if main else None)
    if _all_ok(error is None):
        error = _attempt(error, lambda: _write_parts(tmp, accelerator, tensors, optim_json, scheduler, data_state))
    if _all_ok(error is None) and main:  # every process's files are in tmp now: record them, last
        error = _attempt(error, lambda: _write_json(tmp / TRAINER_STATE, {
            **trainer_state, "processes": accelerator.num_processes, "files": _file_records(tmp),
            "format_version": FORMAT_VERSION}))
    if not _all_ok(error is None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoint_dirs(out_dir)
        reason = _describe_write_error(error) if error is not None else "another process failed to write its part"
        raise ConfigError(
            f"could not write checkpoint step_{step} in {str(root)!r}: {reason}; the partial write was removed and "
            f"the previous checkpoint is kept ({kept[-1].name if kept else 'none'}); free space there and resume=auto"
        ) from error
    accelerator.wait_for_everyone()
    if main:
        _replace(root, final, tmp, step)
        for old in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fresh_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
    tmp.mkdir(parents=True)


def _replace(root: Path, final: Path, tmp: Path, step: int) -> None:
    stale = root / f".old_step_{step}"
    if final.exists():  # a re-run of the same step (e.g. after a resume): replace it whole
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)  # moved aside, not deleted, until the new one is in place
    tmp.rename(final)
    shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- load


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint file {str(path)!r} is missing or corrupt ({type(e).__name__}); "
                          "accepted: a complete checkpoints/step_<N> directory written by dlr-train") from None


def read_trainer_state(ckpt: Path) -> dict:
    state = _read_json(Path(ckpt) / TRAINER_STATE)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {str(ckpt)!r} has format_version={state.get('format_version') if isinstance(state, dict) else None!r}; "
            f"accepted: {FORMAT_VERSION} (written by this dlr-train)"
        )
    missing = [k for k in TRAINER_STATE_KEYS if k not in state]
    if missing or not isinstance(state["files"], dict) or not isinstance(state["config"], dict):
        raise ConfigError(f"checkpoint {str(ckpt)!r} is corrupt: trainer_state.json lacks {', '.join(missing) or 'files'}; "
                          "accepted: a complete checkpoints/step_<N> directory written by dlr-train")
    return state


def _verify_files(ckpt: Path, recorded: dict, verify: bool) -> None:
    """Every file trainer_state.json records is there with its size (and, with verify, its sha256)."""
    for name, rec in recorded.items():
        f = ckpt / name
        if not f.is_file():
            raise ConfigError(f"checkpoint file {str(f)!r} is missing; accepted: a complete checkpoints/step_<N> "
                              "directory written by dlr-train")
        if f.stat().st_size != rec.get("size"):
            raise ConfigError(f"checkpoint file {str(f)!r} is truncated or corrupted: {f.stat().st_size} bytes, "
                              f"expected {rec.get('size')}")
        if verify and _sha256(f) != rec.get("sha256"):
            raise ConfigError(f"checkpoint file {str(f)!r} does not match its sha256 in {TRAINER_STATE} (corrupted); "
                              "accepted: an intact checkpoint (verify=false resumes from it unchecked)")


def check_checkpoint(ckpt: Path, verify: bool = True) -> dict:
    """Check a checkpoint before any work, so damage is one line up front; returns the trainer state.

    Every file's size against trainer_state.json's record, with `verify` its sha256 too (one
    read of the checkpoint), and every JSON file and safetensors header."""
    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    _verify_files(ckpt, state["files"], verify)
    for name in ("optimizer.json", "scheduler.json", "data.json"):
        _read_json(ckpt / name)
    files = sorted((ckpt / STATE_DIR).glob("*.safetensors")) if (ckpt / STATE_DIR).is_dir() else []
    files += sorted(ckpt.glob("rng_*.safetensors"))
    if not any(f.parent.name == STATE_DIR for f in files):
        raise ConfigError(f"checkpoint {str(ckpt)!r} has no {STATE_DIR}/*.safetensors; it is incomplete or corrupt")
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"checkpoint {str(ckpt)!r} is corrupt: {f.name}: {_one_line(e)}") from None
    return state


def load_checkpoint(accelerator, ckpt: Path, model, optimizer, scheduler, verify: bool = True, *,
                    checked: dict | None = None) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler/RNG in place, resharded to this run's processes.

    `checked`: what check_checkpoint(ckpt) returned (dlr-train checks a checkpoint before any
    work, and reads it once); None: checked here first, with `verify`.
    Returns (trainer_state, data_state) where data_state has "process" (this rank's own
    position, or None when the number of processes changed) and "global".
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    ckpt = Path(ckpt)
    trainer_state = check_checkpoint(ckpt, verify) if checked is None else checked
    optim_json = _read_json(ckpt / "optimizer.json")
    scheduler_state = _read_json(ckpt / "scheduler.json")
    data_global = _read_json(ckpt / "data.json")
    rank, same_world = accelerator.process_index, trainer_state["processes"] == accelerator.num_processes
    data_process = _read_json(ckpt / f"data_{rank}.json") if same_world else None

    model_sd, optim_sd = _state_dicts(model, optimizer)  # this run's layout, to be filled in place
    targets = {f"model.{k}": v for k, v in model_sd.items()}
    try:
        for fqn, entry in optim_json["state"].items():
            for key, spec in entry.items():
                if "tensor" in spec:
                    targets[spec["tensor"]] = optim_sd["state"][fqn][key]
                else:
                    optim_sd["state"][fqn][key] = spec["value"]
        if set(optim_json["state"]) != set(optim_sd["state"]):
            raise KeyError(sorted(set(optim_json["state"]) ^ set(optim_sd["state"]))[0])
        optim_sd["param_groups"] = optim_json["param_groups"]
        with _quiet_single_process():
            dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt / STATE_DIR)), no_dist=not _distributed())
        set_state_dict(plain_module(model), optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        scheduler.load_state_dict(scheduler_state)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError, SafetensorError, AssertionError,
            CheckpointException) as e:
        detail = _one_line(e)
        raise ConfigError(
            f"checkpoint {str(ckpt)!r} is corrupt or does not match this model and optimizer ({detail}); "
            "accepted: a complete checkpoint of the same model, method, rank and optimizer"
        ) from None
    rng_file = ckpt / f"rng_{rank}.safetensors"
    if rng_file.exists():  # a process that did not exist in the saved run keeps its seeded RNG
        try:
            from safetensors import safe_open

            with safe_open(str(rng_file), framework="pt") as f:
                meta = f.metadata()
            _set_rng(load_file(rng_file), meta)
        except (SafetensorError, KeyError, ValueError, RuntimeError) as e:
            raise ConfigError(f"checkpoint file {str(rng_file)!r} is corrupt ({type(e).__name__})") from None
    return trainer_state, {"process": data_process, "global": data_global}
