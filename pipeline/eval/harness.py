"""EleutherAI's lm-evaluation-harness on a checkpoint: ``--lm-eval TASK,...`` and ``--lm-eval-include DIR``.

A task is a registered lm-eval name (``hellaswag``), a task YAML file (``tasks/cloze_stdlib.yaml``)
or the name of a task in an ``--lm-eval-include`` folder. All of them are loaded, data included,
before any model is: one that cannot be loaded is a ConfigError naming it (exit 2).

The checkpoint is scored **in this process, through a thin adapter over our own model**
(lm_adapter.py), not through its transformers export:

- the eval job has already loaded the verified weights for its other metrics; an export would write
  a second full copy of them to disk for every checkpoint ``--watch`` sees;
- the adapter tokenizes exactly as the built-in zero-shot tasks do (tasks.py: end-of-document token
  first, continuations on their own), so a task scores the same through ``--lm-eval`` as through
  ``--tasks`` — the bundled tasks/*.yaml and tasks/*.jsonl are the same items, and a test holds
  the two accuracies equal;
- it scores every architecture we train, including ones no transformers class has, and runs the
  same inside the Ray task of ``--ray``.

lm-eval contributes what it is for: task definitions, prompts, filters, metrics and aggregation.
Relative ``dataset_kwargs.data_files`` of a local task YAML are found beside the YAML (lm-eval
itself reads them from the working directory), so tasks/ works from any directory, offline.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.eval import EvalError

BOOTSTRAP_ITERS = 1000  # stderr of metrics with no closed form (perplexity); means have one


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError(
            "--lm-eval needs EleutherAI's lm-evaluation-harness, which is not installed in this "
            "environment: `pip install 'lm-eval[hf]>=0.4.13'` (or this project's `[lm-eval]` extra). Its "
            "registered tasks download their data from the Hugging Face Hub; local task YAMLs "
            "(tasks/*.yaml) need no network. The built-in zero-shot tasks (--tasks FILE.jsonl) need neither."
        )


@functools.lru_cache(maxsize=4)
def _manager(include: tuple[str, ...], defaults: bool):
    """lm-eval's task index: of the include folders only (instant), or with its own thousands of
    registered tasks too (indexing those takes seconds, so only when a name needs them)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _beside(base: Path, path):
    if not isinstance(path, str) or "://" in path or Path(path).is_absolute():
        return path
    return str(base / path) if (base / path).exists() else path


def rebase_data_files(cfg: dict, base: Path) -> dict:
    """``cfg`` with each relative ``dataset_kwargs.data_files`` entry that exists under ``base``
    made absolute (str, list, or a {split: str | list} mapping)."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None:
        return cfg

    def fix(value):
        return [_beside(base, v) for v in value] if isinstance(value, list) else _beside(base, value)

    files = {k: fix(v) for k, v in files.items()} if isinstance(files, dict) else fix(files)
    return {**cfg, "dataset_kwargs": {**kwargs, "data_files": files}}


def _local_task(path: Path):
    """A task YAML as an inline config (functions resolved, includes merged, data files found beside
    it); a group or Python-class YAML as its path, for lm-eval to load as it is."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path, resolve_func=True, recursive=True)
    if isinstance(cfg.get("task"), str) and "group" not in cfg and "class" not in cfg:
        return rebase_data_files(cfg, path.parent)
    return str(path)


def _spec(name: str, include: tuple[str, ...]):
    """(what lm-eval loads for ``name``, the task manager that loads it)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--lm-eval: cannot load task {name!r}: no such file")
        return _local_task(path.resolve()), _manager(include, False)
    if include:
        local = _manager(include, False)
        entry = local.task_index.get(name)
        if entry is not None:
            plain = entry.yaml_path is not None and entry.kind.name == "TASK"
            return (_local_task(Path(entry.yaml_path)) if plain else name), local
    return name, _manager(include, True)


def _top_level(found: dict) -> list:
    """The tasks and groups ``TaskManager.load`` built, minus those inside a group it built."""
    inner = {child for children in found.get("group_map", {}).values() for child in children}
    groups = [g for name, g in found.get("groups", {}).items() if name not in inner]
    return groups + [t for name, t in found["tasks"].items() if name not in inner]


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError's str() is a repr
    text = " ".join(str(text).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_tasks(names: tuple[str, ...] | list[str], include: tuple[str, ...] = ()) -> list:
    """lm-eval's Task/Group objects for ``names``, their data loaded; a ConfigError line naming the
    first task that cannot be loaded (unknown name, broken YAML, missing data, no network)."""
    require_lm_eval()
    include = tuple(str(Path(d).resolve()) for d in include)
    for folder in include:
        if not Path(folder).is_dir():
            raise ConfigError(f"--lm-eval-include: no such directory: {folder}")
    loaded = []
    for name in names:
        try:
            spec, manager = _spec(name, include)
            loaded += _top_level(manager.load([spec]))
        except ConfigError:
            raise
        except Exception as exc:  # KeyError, ValueError, FileNotFoundError, datasets' and yaml's errors
            raise ConfigError(f"--lm-eval: cannot load task {name!r}: {_one_line(exc)}") from None
    return loaded


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from ``simple_evaluate``'s results: every finite number, named
    ``metric`` (``acc``, ``acc_stderr``) or, under a filter other than none, ``metric_filter``;
    plus ``examples``, the number of documents scored."""
    out = {}
    counts = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "sample_len" or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                continue  # sample_len: the document count, kept as `examples`
            metric, _, kind = key.partition(",")
            row[metric if kind in ("", "none") else f"{metric}_{kind}"] = float(value)
        if isinstance(counts.get(task), dict) and "effective" in counts[task]:
            row["examples"] = int(counts[task]["effective"])
        out[task] = row
    return out


@contextlib.contextmanager
def _bootstrap_in_process():
    """lm-eval bootstraps with a process pool per metric unless DISABLE_MULTIPROC is set; the eval
    job (signal handlers, a Ray worker, torch threads) must not fork for that."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def run_lm_eval(names, include, model, tokenizer, eod_id: int, max_len: int, batch_size: int,
                device: str) -> dict[str, dict[str, float]]:
    """Score ``model`` (loaded, causal) on lm-eval tasks; {task: {metric: value}}."""
    import lm_eval

    from pipeline.eval.lm_adapter import CheckpointLM

    tasks = load_tasks(names, include)
    lm = CheckpointLM(model, tokenizer, eod_id, max_len, batch_size, device)
    include = tuple(str(Path(d).resolve()) for d in include)
    with _bootstrap_in_process():
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=_manager(include, False),
                                          log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
    return metrics_of(results or {})
