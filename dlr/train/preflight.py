"""What dlr-train checks before it touches the run directory.

Every check here is cheap and reads only: a bad out_dir, resume value or data file is
refused with one line while an existing run directory stays byte-identical.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from ..data.sources import check_local_file, holdout_boundary, resolve_files
from ..data.spec import DataSpec
from ..errors import ConfigError

# Local .gz files up to this size are decompressed whole, so a truncated one is found now
# rather than mid-run; larger ones are checked at their first record only (cost).
FULL_CHECK_BYTES = 64 << 20


def _nearest_existing(p: Path) -> Path:
    """The deepest existing directory entry on the way to p (from the root down: a too-long
    name below it would make exists() itself fail)."""
    existing = Path(p.anchor or ".")
    for part in p.parts[len(existing.parts):]:
        if not (existing / part).exists():
            break
        existing = existing / part
    return existing


def check_out_dir(out_dir: Path) -> None:
    """out_dir must be a directory we can name, create and write in; reads only."""
    p = Path(out_dir).absolute()
    name_max = os.pathconf("/", "PC_NAME_MAX")
    for part in p.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"out_dir={str(out_dir)!r} has a path component of {len(os.fsencode(part))} bytes; "
                              f"accepted: components of at most {name_max} bytes")
    try:
        existing = _nearest_existing(p)
    except OSError as e:  # e.g. the whole path longer than the system allows
        raise ConfigError(f"out_dir={str(out_dir)!r} cannot be named ({e.strerror}); accepted: a shorter path") from None
    if existing == p and not p.is_dir():
        raise ConfigError(f"out_dir={str(out_dir)!r} is a file; accepted: a directory (new, or a run of this config)")
    if not existing.is_dir():
        raise ConfigError(f"out_dir={str(out_dir)!r} cannot be created: {str(existing)!r} is a file; "
                          "accepted: a directory path")
    # A kernel pseudo-filesystem (/proc, /sys) has no blocks to store a run in; os.access
    # says yes there for root, and mkdir then fails.
    if not os.access(existing, os.W_OK | os.X_OK) or os.statvfs(existing).f_blocks == 0:
        raise ConfigError(f"out_dir={str(out_dir)!r} is not writable ({str(existing)!r} denies it); "
                          "accepted: a writable directory")


def check_resume(resume: str) -> Path | None:
    """`resume` must be auto, never, or a training checkpoint directory; the directory is returned."""
    if resume in ("auto", "never"):
        return None
    path = Path(str(resume)).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume={str(resume)!r} is not a checkpoint directory; "
                          "accepted: auto, never, or a checkpoints/step_<N> dir")
    return path


def _check_whole_gzip(path: str) -> None:
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"data file {path!r} is truncated or corrupted ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:80]}); accepted: an intact file") from None


def check_data_files(spec: DataSpec) -> None:
    """Resolve both splits and open every local file (first record; small .gz files whole).

    data=tokens is checked by its own loader (manifest, shard sizes) when the spec is built.
    """
    if spec.source == "tokens":
        return
    if spec.source == "mix":
        for _, _, sub in spec.mix:
            check_data_files(sub)
        return
    for split in ("train", "validation"):
        for path in resolve_files(spec, split):
            if path.startswith("hf://"):
                continue
            if os.path.getsize(path) == 0:
                raise ConfigError(f"data.{split}_files: {path!r} is empty; accepted: a file with documents")
            check_local_file(spec, path)
            if path.endswith(".gz") and os.path.getsize(path) <= FULL_CHECK_BYTES:
                _check_whole_gzip(path)
    if spec.holdout is not None:
        holdout_boundary(spec)  # a held-out set larger than the corpus is refused before anything is written

