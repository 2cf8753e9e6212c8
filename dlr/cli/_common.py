"""The one entry pattern of every dlr command (dlr-train, -eval, -fold, -finetune, -prepare,
-compare, -scaling).

Each command is `main(argv) -> run_cli(prog, usage, body, argv)`: `body` gets the arguments
and returns an exit code, and `run_cli` maps failures onto the one exit-code convention:

    0  done            2  bad input (one line: `<prog>: error: ...`, nothing written)
    3  diverged        1  a bug (Python's traceback)
    130 / 143  stopped by SIGINT / SIGTERM (one line; a run keeps its last checkpoint and frees its lock)
    141  its output was closed early (`| head`): it stops quietly, as a shell tool does

Overrides become the command's typed config in `dlr.config.from_overrides` (Hydra's compose
API; unknown keys refused before composing, values validated before anything runs).
dlr-train keeps `@hydra.main` for multirun (-m), but checks every sweep combination with
`from_overrides` first.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The CLI modules take the config parsing from here, with the exit-code convention.
from dlr.config.overrides import canonical_overrides, compose, from_overrides, parse_overrides, typed  # noqa: F401
from dlr.errors import ConfigError, TrainingDiverged

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_CHECK_FAILED = 1  # dlr-fold: the fold's verification failed (reported above, nothing written)
def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write strict JSON atomically (temp file + rename) so a reader never sees half a file."""
    from dlr.atomic import write_atomic
    from ..artifacts.run_dir import dumps_strict

    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"out={str(p)!r} is a directory; give a file name, e.g. out={p / 'eval.json'}")
    return write_atomic(p, dumps_strict(obj, indent=2, sort_keys=True) + "\n")


USAGE_FLAGS = ("-h", "--help")
EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_CLOSED_OUTPUT = 130, 143, 141


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds as SIGINT does (finally blocks run)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _closed_output() -> int:
    # Further writes (and the flush at exit) go nowhere instead of raising again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_CLOSED_OUTPUT

# Third-party log lines that say nothing to a dlr user, by logger: what dlr does on purpose
# (lm_eval is handed a loaded model) and hints for other tools' command lines. Matched by
# their text, so a new or different message from the same library still shows.
THIRD_PARTY_NOISE: dict[str, tuple[str, ...]] = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}


class _Drop(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


def quiet_third_party() -> None:
    """Keep the known third-party noise (THIRD_PARTY_NOISE) out of a command's output (idempotent)."""
    for name, texts in THIRD_PARTY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(texts))


def guarded(prog: str, body: Callable[..., int], *args: Any) -> int:
    """body(*args) -> its exit code; ConfigError -> 2 and TrainingDiverged -> 3, each one line on
    stderr; SIGINT / SIGTERM -> 130 / 143 with one line; a closed stdout -> 141, quietly."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = body(*args)
        sys.stdout.flush()  # here, so a reader that went away is seen while we can still handle it
        return code
    except ConfigError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        print(f"{prog}: diverged: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_DIVERGED
    except BrokenPipeError:
        return _closed_output()
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def print_help(prog: str, usage: str) -> int:
    from dlr.config.help import SUMMARIES, command_help

    command = prog.removeprefix("dlr-")
    print(command_help(command) + "\nexamples:\n" + usage.strip() if command in SUMMARIES else usage.strip())
    return 0


def run_cli(prog: str, usage: str, body: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """Call body(args) and exit with its code (see the module docstring for the convention)."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party()
    if any(a in USAGE_FLAGS for a in args):
        sys.exit(guarded(prog, print_help, prog, usage))
    sys.exit(guarded(prog, body, args))
