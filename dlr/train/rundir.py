"""The run directory contract that dlr-eval, dlr-fold and dlr-compare rely on, and its guards.

out_dir/config.yaml (resolved), metrics.jsonl, checkpoints/step_<N>/, final/, folded/
(method=dlr), summary.json. Only the main process writes here, holding `RunLock`
(out_dir/.lock, removed when the run ends); every file is written atomically (dlr.atomic).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path

import yaml

from ..atomic import file_mode, remove_stale_temps, write_atomic
from ..config import TrainConfig, display_key, runtime_keys, to_dict
from ..errors import ConfigError

LOCK_FILE = ".lock"
# Settings that may change between a run and its resumption without making it another run
# (declared `runtime` where they are declared); out_dir is one: a run directory that was
# copied or moved resumes where it now is.
RUNTIME_KEYS = frozenset(runtime_keys(TrainConfig))


def _identity(cfg: dict, prefix: str = "") -> dict:
    """The settings that make a run this run: every key but the runtime ones."""
    out = {}
    for key, value in cfg.items():
        dotted = prefix + str(key)
        if dotted in RUNTIME_KEYS:
            continue
        out[key] = _identity(value, dotted + ".") if isinstance(value, dict) else value
    return out


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
    previous = yaml.safe_load(saved.read_text()) or {}
    diff = sorted(display_key("train", k) for k in _differences(_identity(previous), _identity(resolved)))
    if diff:
        raise ConfigError(
            f"out_dir={str(out_dir)!r} holds a run with a different config (differs in: {', '.join(diff[:8])}); "
            "accepted: the same config (to resume) or another out_dir"
        )


def write_config(out_dir: Path, cfg: TrainConfig) -> None:
    """config.yaml, atomically, and only when its content changes (a resume rewrites nothing)."""
    path = Path(out_dir) / "config.yaml"
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if not (path.is_file() and path.read_text() == text):
        write_atomic(path, text)


def finished_summary(out_dir: Path) -> dict | None:
    """The summary of a run that has finished (summary.json and final/ written), else None."""
    path = Path(out_dir) / "summary.json"
    if not (path.is_file() and (Path(out_dir) / "final").is_dir()):
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn by hand; finishing again rewrites it


# Lock fds this process holds. A forked child (a DataLoader worker) closes its copies, so the
# lock dies with the process that took it, not with the last of its workers.
_HELD_LOCK_FDS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


class RunLock:
    """Exclusive ownership of a run directory by one dlr-train process (the main process).

    flock(2) on out_dir/.lock: the kernel drops it when its holder dies, so a lock left by a
    killed process is taken over by the next run, while a live holder is reported by pid.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.path, self.fd, self.created = Path(out_dir), Path(out_dir) / LOCK_FILE, None, False

    def acquire(self) -> "RunLock":
        self.created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(f"out_dir={str(self.out_dir)!r} is in use by another dlr-train (pid {holder}); "
                                  "accepted: wait for it to end, or another out_dir") from None
            # The holder we waited on may have removed the file: then our lock is on a ghost.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def release(self, remove_dir_if_empty: bool = False) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        _HELD_LOCK_FDS.discard(self.fd)
        os.close(self.fd)  # closing drops the flock
        self.fd = None
        if remove_dir_if_empty and self.created and set(os.listdir(self.out_dir)) <= {"config.yaml"}:
            # This process made the directory and met bad input before any training state was
            # written (e.g. resume= a checkpoint that does not fit): leave no trace, so the
            # corrected command is not refused as "another run". Anything more is kept.
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _finite(record: dict) -> dict:
    """Strict JSON: a NaN/inf value becomes null and its key is listed under "nonfinite"."""
    bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}


def dumps_strict(obj: dict, **kw) -> str:
    return json.dumps(_finite(obj), allow_nan=False, **kw)


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line torn by a kill: dropped


class MetricsLog:
    """Appends one strict-JSON object per line; safe to reopen after a resume."""

    def __init__(self, path: Path, enabled: bool, start_step: int = 0) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled and start_step > 0 and self.path.exists():
            # Records past the checkpoint we resume from would be duplicated by the replay.
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if _step(line) <= start_step]
            if kept != lines:
                write_atomic(self.path, "".join(line + "\n" for line in kept))
        elif enabled and start_step == 0 and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if self.enabled:
            # One write() of one line to an O_APPEND file: a kill leaves whole lines only
            # (a torn last line at worst, which the resume above drops with the step filter).
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode())
            try:
                os.write(fd, (dumps_strict({**record, "time": round(time.time(), 3)}) + "\n").encode())
            finally:
                os.close(fd)


def write_summary(out_dir: Path, summary: dict) -> None:
    write_atomic(Path(out_dir) / "summary.json", dumps_strict(summary, indent=2) + "\n")


def tidy(out_dir: Path) -> None:
    """Remove temporaries that dead writers left in the run directory (we hold the lock)."""
    for target in (Path(out_dir) / "final", Path(out_dir) / "folded", Path(out_dir) / "config.yaml",
                   Path(out_dir) / "summary.json", Path(out_dir) / "metrics.jsonl"):
        remove_stale_temps(target)
    # A training checkpoint being assembled when its writer died (dlr/train/state.py's temp).
    ckpts = Path(out_dir) / "checkpoints"
    if ckpts.is_dir():
        for p in ckpts.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)
