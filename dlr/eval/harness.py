"""Standard benchmarks through lm-evaluation-harness, on a model directory we already loaded.

`dlr-eval ckpt=DIR tasks=...` hands the model that `load_model_dir` built and checked to
lm_eval's own `HFLM` class (so task formatting, few-shot sampling, loglikelihood batching and
the standard errors are lm_eval's, not ours) with the directory's `AutoTokenizer`. The bundled
task folder `dlr/assets/tasks` (the offline `c4_cloze` task) is always on lm_eval's include
path; any task name lm_eval knows (hellaswag, arc_easy, ...) works too, given the hub.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dlr.errors import ConfigError, bad_value

BUNDLED_TASKS = ("c4_cloze",)


def bundled_task_dir() -> Path:
    return Path(str(resources.files("dlr.assets").joinpath("tasks")))


@dataclass(frozen=True)
class TaskRequest:
    names: tuple[str, ...]
    num_fewshot: int | None
    limit: int | None
    include_path: str | None
    manager: Any = field(default=None, compare=False, repr=False)  # lm_eval's TaskManager, built once


def split_task_override(args: list[str]) -> list[str]:
    """`tasks=a,b` as the user types it; Hydra would read a bare comma list as a sweep."""
    out = []
    for a in args:
        key, _, value = a.partition("=")
        if key == "tasks" and "," in value and not value.startswith(("[", "'", '"')):
            a = f"tasks=[{value}]"
        out.append(a)
    return out


def parse_tasks(tasks: Any, num_fewshot: Any, limit: Any, include_path: Any) -> TaskRequest:
    """Validate the task options and names (against lm_eval's registry), before any weights are read."""
    if isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",")]
    else:
        try:
            names = [str(t).strip() for t in tasks]
        except TypeError:
            raise bad_value("tasks", tasks, "comma-separated lm-evaluation-harness task names, e.g. tasks=c4_cloze,hellaswag") from None
    if not names or not all(names):
        raise bad_value("tasks", tasks, "comma-separated lm-evaluation-harness task names, e.g. tasks=c4_cloze,hellaswag")
    for key, v in (("num_fewshot", num_fewshot), ("limit", limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "num_fewshot" else 1)):
            raise bad_value(key, v, f"an integer >= {0 if key == 'num_fewshot' else 1}, or null")
    if include_path is not None and not Path(str(include_path)).expanduser().is_dir():
        raise ConfigError(f"include_path={str(include_path)!r} is not a directory of lm-evaluation-harness task YAMLs")
    include = str(Path(str(include_path)).expanduser()) if include_path is not None else None
    names = tuple(dict.fromkeys(names))
    tm = task_manager(include)
    _check_names(tm, names)
    return TaskRequest(names, num_fewshot, limit, include, tm)


def task_manager(include_path: str | None = None):
    from lm_eval.tasks import TaskManager

    paths = [str(bundled_task_dir())] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths)


def _check_names(tm, names: tuple[str, ...]) -> None:
    known = set(tm.all_tasks)
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise ConfigError(f"tasks: unknown lm-evaluation-harness task {name!r}; {hint}bundled (offline): "
                              f"{', '.join(BUNDLED_TASKS)}; any task `lm-eval ls tasks` lists otherwise")


def _metrics(raw: dict) -> dict[str, Any]:
    """lm_eval's {"acc,none": x, "acc_stderr,none": s, "alias": ...} -> {"acc": x, "acc_stderr": s}."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "alias" or "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}[{filt}]"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            out[name] = value if math.isfinite(value) else None  # lm_eval gives "N/A"/nan stderr for n=1
        elif value == "N/A":
            out[name] = None
    return out


def _quiet(bar: type) -> Any:
    """`bar` (a tqdm class) that never shows."""
    return lambda *args, **kwargs: bar(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm_eval's run without its progress bars, datasets' "Generating train split" bars (lm_eval
    loads the task data) and lm_eval's `git describe` (which prints "fatal: not a git repository"
    outside a checkout, for a hash dlr does not report): dlr-eval prints its own lines. Warnings
    and errors still show; everything is restored on the way out."""
    import datasets
    import lm_eval.evaluator
    from tqdm.std import tqdm

    # lm_eval makes its bars with the `tqdm` each of its modules imported, and offers no switch
    # for all of them (the task's request-building bar has none).
    bars = [(m, m.tqdm) for name, m in list(sys.modules.items()) if name.startswith("lm_eval")
            and isinstance(getattr(m, "tqdm", None), type) and issubclass(m.tqdm, tqdm)]
    git_hash = lm_eval.evaluator.get_git_commit_hash
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    for m, bar in bars:
        m.tqdm = _quiet(bar)
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash
        for m, bar in bars:
            m.tqdm = bar
        if shown:
            datasets.enable_progress_bars()


def run_tasks(model: torch.nn.Module, ckpt: str | os.PathLike, req: TaskRequest, batch_size: int,
              device: torch.device, dtype: str = "fp32") -> dict[str, dict[str, Any]]:
    """{task: {metric: value, metric_stderr: value, samples, num_fewshot, version}} from lm_eval."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tm = req.manager or task_manager(req.include_path)
    _check_names(tm, req.names)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:
        raise ConfigError(f"{str(ckpt)!r}: AutoTokenizer cannot load its tokenizer ({str(e).splitlines()[0][:160]}); "
                          "re-save it with dlr-fold or dlr.data.load_tokenizer(dir).save(dir)") from None
    # lm_eval logs every request batch at INFO; keep warnings.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, device=str(device),
              mixed_precision_dtype=torch.bfloat16 if dtype == "bf16" else None)
    try:
        with quiet_lm_eval():
            out = simple_evaluate(model=lm, tasks=list(req.names), num_fewshot=req.num_fewshot, limit=req.limit,
                                  task_manager=tm, log_samples=False, bootstrap_iters=1000)
    except (ConnectionError, OSError) as e:
        raise ConfigError(f"tasks={','.join(req.names)}: the task data could not be read ({str(e).splitlines()[0][:160]}); "
                          f"hub tasks need the network, offline use the bundled {', '.join(BUNDLED_TASKS)}") from None
    results: dict[str, dict[str, Any]] = {}
    for section in ("results", "groups"):
        for task, raw in (out.get(section) or {}).items():
            m = _metrics(raw)
            n = (out.get("n-samples") or {}).get(task, {})
            m["samples"] = n.get("effective") if isinstance(n, dict) else None
            m["num_fewshot"] = (out.get("n-shot") or {}).get(task)
            m["version"] = (out.get("versions") or {}).get(task)
            results[task] = m
    return results
