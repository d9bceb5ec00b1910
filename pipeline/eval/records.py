"""Where evaluation results live on disk, and the one-eval-job-per-run lock.

A checkpoint counts as evaluated once its ``eval.json`` exists (written atomically, last): that is
what makes ``pretrain eval --watch`` evaluate each checkpoint exactly once, across restarts. The
same record is also kept as ``RUN_DIR/eval/step_NNNNNNNN.json``, because checkpoint retention
deletes old checkpoint directories and the report, status and W&B table still need their numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import yaml

from pipeline.config import PipelineConfig, build_config
from pipeline.eval import EvalError
from pipeline.train import checkpoint as ckpt

EVAL_JSON = "eval.json"
EVAL_DIR = "eval"  # under the run directory
_RECORD = re.compile(r"^step_(\d{8,})\.json$")


def _atomic_write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def checkpoint_config(path: Path) -> PipelineConfig:
    file = Path(path) / "config.yaml"
    return build_config(yaml.safe_load(file.read_text(encoding="utf-8")), origin=f"({file})")


def run_config(run_dir: str | Path) -> PipelineConfig | None:
    """The run's newest resolved config: run_dir/config.yaml (written at each launch), else the
    newest checkpoint's, else None (nothing launched yet)."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return checkpoint_config(run_dir)
    found = ckpt.committed_checkpoints(run_dir / "checkpoints")
    return checkpoint_config(found[-1].path) if found else None


def record_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"step_{step:08d}.json"


def is_evaluated(checkpoint_path: Path) -> bool:
    return (Path(checkpoint_path) / EVAL_JSON).is_file()


def write_record(run_dir: str | Path, result: dict) -> Path | None:
    """Keep ``result`` in the run's eval directory, then (last) as the checkpoint's ``eval.json``.

    Returns the eval.json path, or None when retention deleted the checkpoint meanwhile.
    """
    path = record_path(run_dir, result["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, result)
    checkpoint = Path(result["checkpoint"])
    try:
        _atomic_write(checkpoint / EVAL_JSON, result)
    except FileNotFoundError:
        return None
    return checkpoint / EVAL_JSON


def load_records(run_dir: str | Path) -> list[dict]:
    """Every evaluated checkpoint of a run, oldest step first (the newest record per step wins)."""
    run_dir = Path(run_dir)
    found: dict[int, dict] = {}
    candidates = sorted((run_dir / EVAL_DIR).glob("step_*.json")) + sorted(
        (run_dir / "checkpoints").glob(f"step_*/{EVAL_JSON}"))
    for path in candidates:
        if path.name != EVAL_JSON and not _RECORD.match(path.name):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # deleted or being replaced right now; the other copy has it
        step = record.get("step")
        if isinstance(step, int) and record.get("time", 0) >= found.get(step, {}).get("time", -1):
            found[step] = record
    return [found[s] for s in sorted(found)]


@contextlib.contextmanager
def eval_lock(run_dir: str | Path, lease_s: float, heartbeat_s: float):
    """Hold a lease on ``RUN_DIR/eval``: one eval job per run at a time (two would race on eval.json
    and on the eval W&B run). Raises EvalError naming the holder."""
    from pipeline.launch.lock import RunLock, RunLocked, read_lease

    lock = RunLock(Path(run_dir) / EVAL_DIR, lease_s, heartbeat_s, command="pretrain eval")
    try:
        lock.acquire()
    except RunLocked:
        holder = read_lease(lock.run_dir)
        who = holder.describe(time.time()) if holder else "another process"
        raise EvalError(
            f"{run_dir}: another eval job holds {lock.path} ({who}); it evaluates every new "
            f"checkpoint of this run, so wait for it or stop it (SIGTERM) first"
        ) from None
    try:
        yield lock
    finally:
        lock.release()


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl log (e.g. metrics.jsonl); a torn last line from a live writer is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
