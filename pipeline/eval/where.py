"""What a path given to `pretrain eval|status|report` is, and the run directory it stands for.

Each of them takes a run directory (RUN, with config.yaml or checkpoints/) or one of its checkpoint
directories (RUN/checkpoints/step_N, which stands for its run). Anything else is refused in one line
that says what the path is instead (missing, a file, a config file and the run it names, a prepared
dataset, a checkpoint outside a run) and what to give.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.eval import EvalError
from pipeline.rundir import DatasetDir, RunDir
from pipeline.storage import open_storage
from pipeline.train import checkpoint as ckpt


def _config_run_dir(path: Path) -> str | None:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return str(raw["run_dir"]) if isinstance(raw, dict) and raw.get("run_dir") else None


def describe(path: str | Path) -> str | None:
    """What ``path`` is, when it is neither a run directory nor one of its checkpoints (else None)."""
    p = Path(path)
    if "://" not in str(path):
        if not p.exists():
            return "does not exist"
        if p.is_file():
            if p.suffix in (".yaml", ".yml"):
                named = _config_run_dir(p)
                return "is a config file" + (f" (its run directory: {named})" if named else "")
            return "is a file, not a directory"
    if RunDir.of_checkpoint(p) is not None:
        return None
    store = open_storage(path)
    if store.exists(DatasetDir.MANIFEST):
        return f"is a prepared dataset directory (it has {DatasetDir.MANIFEST}), not a run"
    if store.exists(ckpt.COMMIT):
        return f"is a checkpoint outside a run directory (expected RUN/{RunDir.CHECKPOINTS}/step_N)"
    if store.exists(RunDir.CONFIG) or store.has_prefix(RunDir.CHECKPOINTS):
        return None
    return f"is a directory with no {RunDir.CONFIG}, no {RunDir.CHECKPOINTS}/ and no {DatasetDir.MANIFEST}"


def run_dir_of(path: str | Path, command: str) -> Path:
    """The run directory ``path`` stands for (itself, or the run of a checkpoint directory)."""
    what = describe(path)
    if what is not None:
        raise EvalError(f"{path}: not a run directory: it {what}; `pretrain {command}` takes a run directory (RUN, with {RunDir.CONFIG} "
                        f"or {RunDir.CHECKPOINTS}/) or one of its checkpoints (RUN/{RunDir.CHECKPOINTS}/step_N)")
    run = RunDir.of_checkpoint(Path(path))
    return run.root if run is not None else Path(path)
