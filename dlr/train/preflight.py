"""What dlr-train checks before it touches the run directory.

Every check here is cheap and reads only: a bad out_dir, resume value or data file is
refused with one line while an existing run directory stays byte-identical.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from ..atomic import check_writable
from ..data.sources import check_local_file, holdout_boundary, resolve_files
from ..data.spec import DataSpec
from ..errors import ConfigError

# Local .gz files up to this size are decompressed whole, so a truncated one is found now
# rather than mid-run; larger ones are checked at their first record only (cost).
FULL_CHECK_BYTES = 64 << 20


def check_out_dir(out_dir: Path) -> None:
    """out_dir must be a directory we can name, create and write in; reads only."""
    check_writable(out_dir, "out_dir")


def check_resume(resume: str) -> Path | None:
    """`resume` must be auto, never, or a training checkpoint directory; the directory is returned."""
    if resume in ("auto", "never"):
        return None
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume={resume!r} is not a checkpoint directory; "
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

