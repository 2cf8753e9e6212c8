"""The run directory: its names, its lock, its metrics and summary files, and their guards.

dlr-train writes it; dlr-eval, dlr-fold and dlr-compare read it:

    out_dir/config.yaml        the resolved settings (CONFIG_FILE)
    out_dir/metrics.jsonl      one strict-JSON record per line (METRICS_FILE, MetricsLog)
    out_dir/checkpoints/step_<N>/  training state (CHECKPOINTS_DIR; dlr.train.checkpoint_files)
    out_dir/final/, folded/    model directories (FINAL_DIR, FOLDED_DIR; folded/ for method=dlr)
    out_dir/summary.json       written last, with format_version (SUMMARY_FILE, read_summary)

Only the main process writes here, holding `RunLock` (out_dir/.lock, removed when the run
ends); every file is written atomically (dlr.atomic).
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
from ..config import TrainConfig, display_key, runtime_keys
from ..errors import ConfigError

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, LOCK_FILE = "config.yaml", "metrics.jsonl", "summary.json", ".lock"
CHECKPOINTS_DIR, FINAL_DIR, FOLDED_DIR = "checkpoints", "final", "folded"
# The run directory's format, recorded in summary.json; a run of another format is refused.
RUN_FORMAT_VERSION = 1
# Settings that may change between a run and its resumption without making it another run
# (declared `runtime` where they are declared); out_dir is one: a run directory that was
# copied or moved resumes where it now is.
RUNTIME_KEYS = frozenset(runtime_keys(TrainConfig))


def _identity(cfg: dict, prefix: str = "") -> dict:
    """The settings that make a run this run: every key but the runtime ones."""
    out = {}
    for key, value in cfg.items():
        dotted = prefix + str(key)
        if dotted not in RUNTIME_KEYS:
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


def read_run_config(out_dir: Path) -> dict:
    """The settings a run directory was written with (its config.yaml), as plain data;
    ConfigError (one line) if it cannot be read or is not a mapping of settings."""
    path = Path(out_dir) / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{str(path)!r} is not readable YAML ({type(e).__name__}{where}); accepted: the config.yaml "
                          "dlr-train wrote (restore it, or remove it to resume from the checkpoints)") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{str(path)!r} holds a YAML {type(config).__name__}, not a mapping of settings; accepted: "
                          "the config.yaml dlr-train wrote (restore it, or remove it to resume from the checkpoints)")
    return config


def _value(cfg: dict, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def settings_differences(previous: dict, resolved: dict) -> list[str]:
    """`key: old -> new` for every setting but the runtime ones in which two runs' settings differ."""
    keys = sorted(_differences(_identity(previous), _identity(resolved)), key=lambda k: display_key("train", k))
    return [f"{display_key('train', k)}: {_value(previous, k)!r} -> {_value(resolved, k)!r}" for k in keys]


def check_run_dir(out_dir: Path, resolved: dict, *, allow_changed: bool = False) -> None:
    """An existing out_dir from a different config is never silently overwritten (allow_changed:
    the user said resume_changed=true)."""
    if not (Path(out_dir) / CONFIG_FILE).exists():
        return
    diff = settings_differences(read_run_config(out_dir), resolved)
    if diff and not allow_changed:
        raise ConfigError(
            f"out_dir={str(out_dir)!r} holds a run with a different config (differs in: {'; '.join(diff[:8])}); "
            "accepted: the same config (to resume), another out_dir, or resume_changed=true"
        )


def write_config(out_dir: Path, resolved: dict) -> None:
    """config.yaml, atomically, and only when its content changes (a resume rewrites nothing)."""
    path = Path(out_dir) / CONFIG_FILE
    text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, default_flow_style=False)
    if not (path.is_file() and path.read_text() == text):
        write_atomic(path, text)


def check_run_format(summary: dict, out_dir: Path) -> dict:
    """`summary` if its run directory has this format; else one line naming both versions."""
    found = summary.get("format_version") if isinstance(summary, dict) else None
    if found != RUN_FORMAT_VERSION:
        raise ConfigError(f"run directory {str(out_dir)!r} has format_version={found!r}; "
                          f"accepted: {RUN_FORMAT_VERSION} (written by this dlr-train)")
    return summary


def read_summary(out_dir: Path) -> dict | None:
    """summary.json of a finished run, checked for its format; None if absent or torn."""
    try:
        summary = json.loads((Path(out_dir) / SUMMARY_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # not finished, or torn by hand (finishing again rewrites it)
    return check_run_format(summary, out_dir)


def finished_summary(out_dir: Path) -> dict | None:
    """The summary of a run that has finished (summary.json and final/ written), else None."""
    if not (Path(out_dir) / FINAL_DIR).is_dir():
        return None
    return read_summary(out_dir)


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
        self.out_dir, self.path, self.fd = Path(out_dir), Path(out_dir) / LOCK_FILE, None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock, creating out_dir if it does not exist; ConfigError if either fails."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out_dir={str(self.out_dir)!r} cannot be created ({e.strerror}); "
                              "accepted: a directory path on a writable filesystem") from None
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

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        _HELD_LOCK_FDS.discard(self.fd)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

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


class MetricsLog:
    """Appends one strict-JSON object per line; `lines` counts what the file holds.

    A checkpoint records `lines`; a run resumed from it reopens the log with `keep_lines`
    set to that count, so every record written after the checkpoint (and replayed by the
    resumed run) is dropped first: each record is in the file exactly once. `keep_lines=None`
    starts a fresh log.
    """

    def __init__(self, path: Path, enabled: bool, keep_lines: int | None = None) -> None:
        self.path, self.enabled, self.lines = Path(path), enabled, 0
        if not enabled:
            return
        if keep_lines is None:
            self.path.unlink(missing_ok=True)
            return
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = lines[:keep_lines]
        if kept != lines:
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.lines = len(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            # One write() of one line to an O_APPEND file: a kill leaves whole lines only
            # (a torn last line at worst, past the count a checkpoint holds, so a resume drops it).
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode())
            try:
                os.write(fd, (dumps_strict({**record, "time": round(time.time(), 3)}) + "\n").encode())
            finally:
                os.close(fd)
            self.lines += 1


def read_metrics(out_dir: Path) -> list[dict]:
    """metrics.jsonl's records, oldest first; a line torn by a kill is skipped."""
    path = Path(out_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def write_summary(out_dir: Path, summary: dict) -> None:
    """summary.json, atomically, with this run directory's format_version."""
    record = {**summary, "format_version": RUN_FORMAT_VERSION}
    write_atomic(Path(out_dir) / SUMMARY_FILE, dumps_strict(record, indent=2) + "\n")


def tidy(out_dir: Path) -> None:
    """Remove temporaries that dead writers left in the run directory (we hold the lock)."""
    for name in (FINAL_DIR, FOLDED_DIR, CONFIG_FILE, SUMMARY_FILE, METRICS_FILE):
        remove_stale_temps(Path(out_dir) / name)
    # A training checkpoint being assembled when its writer died (dlr.train.checkpoint_files's temp).
    ckpts = Path(out_dir) / CHECKPOINTS_DIR
    if ckpts.is_dir():
        for p in ckpts.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)
