"""The one way dlr writes files and directories: atomically, with the same file mode.

A reader (or a resume after SIGKILL) sees either the previous version or the complete new
one, never a torn write. Temporaries are named `.<name>.tmp-<pid>-<random>` next to the
target, so a later writer can tell a dead process's leftover from a live one's work and
remove it. Every file ends up with the mode an ordinary `open()` would give (0666 minus
the umask), every directory 0777 minus the umask: `mkstemp`/`mkdtemp` (0600/0700) and
libraries that write through them (e.g. model.safetensors) would otherwise differ.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Delete temporaries of `target` left by processes that no longer run; returns them."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        m = _TEMP.match(p.name)
        if m and m.group("name") == target.name and not _alive(int(m.group("pid"))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` via a synced temporary in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def normalize_modes(root: Path) -> None:
    fm, dm = file_mode(), dir_mode()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, dm)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, fm)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; on success it becomes `out_dir`.

    A crash leaves either the old directory or the complete new one, never a half-written
    one: an existing `out_dir` is only deleted once the new one is in place. A failure
    (disk full included) removes the temporary before the error propagates.
    """
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        normalize_modes(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.rename(out, old / "d")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nearest_existing(p: Path) -> Path:
    """The deepest existing directory entry on the way to p (from the root down: a too-long
    name below it would make exists() itself fail)."""
    existing = Path(p.anchor or ".")
    for part in p.parts[len(existing.parts):]:
        if not (existing / part).exists():
            break
        existing = existing / part
    return existing


def check_writable(path: str | os.PathLike, key: str, *, file: bool = False) -> None:
    """`key=path` names a directory (or, with file=True, a file) that can be created and written
    there; ConfigError (one line) if not. Reads only, so a command can refuse before any work."""
    p = Path(path).expanduser().absolute()
    name_max = os.pathconf("/", "PC_NAME_MAX")
    for part in p.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"{key}={str(path)!r} has a path component of {len(os.fsencode(part))} bytes; "
                              f"accepted: components of at most {name_max} bytes")
    try:
        existing = _nearest_existing(p)
    except OSError as e:  # e.g. the whole path longer than the system allows
        raise ConfigError(f"{key}={str(path)!r} cannot be named ({e.strerror}); accepted: a shorter path") from None
    wanted = "a file name" if file else "a directory"
    if existing == p and p.is_dir() == file:
        raise ConfigError(f"{key}={str(path)!r} is a {'directory' if file else 'file'}; accepted: {wanted}")
    parent = existing.parent if existing == p and file else existing
    if not parent.is_dir():
        raise ConfigError(f"{key}={str(path)!r} cannot be created: {str(parent)!r} is a file; accepted: {wanted} path")
    # A kernel pseudo-filesystem (/proc, /sys) has no blocks to store files in, and os.access
    # says yes there for root; a read-only mount says no through statvfs's flag.
    vfs = os.statvfs(parent)
    if not os.access(parent, os.W_OK | os.X_OK) or vfs.f_blocks == 0 or vfs.f_flag & os.ST_RDONLY:
        raise ConfigError(f"{key}={str(path)!r} is not writable ({str(parent)!r} denies it); "
                          f"accepted: {wanted} on a writable filesystem")
