"""Where evaluation results live on disk, their one type, and the one-eval-job-per-run lock.

A checkpoint counts as evaluated once its ``eval.json`` exists (written atomically, last): that is
what makes ``pretrain eval --watch`` evaluate each checkpoint exactly once, across restarts. The
same record is also kept as ``RUN_DIR/eval/step_NNNNNNNN.json``, because checkpoint retention
deletes old checkpoint directories and the report, status and W&B table still need their numbers.

`EvalRecord` is that record: written by `write_record`, read by `load_records`, both through the
run directory's storage. Only ``step`` is required; records written by hand or by older versions
lack some keys and take the defaults below.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import yaml
from pydantic import Field

from pipeline.config import PipelineConfig, build_config
from pipeline.errors import CorruptFile, LockHeld
from pipeline.eval import EvalError
from pipeline.records import Record
from pipeline.rundir import RunDir, step_of
from pipeline.storage import LocalStorage, StorageError, open_storage
from pipeline.train import checkpoint as ckpt

Number = int | float  # task metrics hold counts ("examples") beside rates


class CorruptEvalRecord(EvalError, CorruptFile):
    """An eval record (``eval.json``, ``eval/step_N.json``) or a run file that does not parse."""


class TokenScores(Record):
    """Loss, perplexity and top-1/top-5 accuracy over the labelled tokens of some samples."""

    error = CorruptEvalRecord
    loss: float
    perplexity: float
    acc_top1: float
    acc_top5: float
    samples: int
    tokens: int


class SplitScores(TokenScores):
    """A split's scores (token-weighted over its sources) and each source's own."""

    sources: dict[str, TokenScores] = Field(default_factory=dict)


class EvalRecord(Record):
    """One evaluated checkpoint: its metrics, and where, when and by what they were computed."""

    error = CorruptEvalRecord
    step: int
    checkpoint: str | None = None
    arch: str | None = None
    consumed_samples: int | None = None
    tokens_trained: int | None = None
    loss: float | None = None  # the headline split's (validation when there is one)
    perplexity: float | None = None
    splits: dict[str, SplitScores] = Field(default_factory=dict)
    tasks: dict[str, dict[str, Number]] = Field(default_factory=dict)
    lm_eval: dict[str, dict[str, Number]] = Field(default_factory=dict)
    metrics: dict[str, Number] = Field(default_factory=dict)  # the flat keys logged (eval/validation/loss, …)
    time: float = 0.0
    seconds: float | None = None
    device: str | None = None
    host: str | None = None
    pid: int | None = None
    code_version: str | None = None
    wandb_run_id: str | None = None  # the eval run it was logged to
    wandb_dir: str | None = None
    train_run_id: str | None = None  # the W&B run that trained the checkpoint (trainer_state.json)

    @classmethod
    def coerce(cls, record: EvalRecord | dict, path: str = "(eval record)") -> EvalRecord:
        """An EvalRecord from an EvalRecord or its JSON dict (scripts and fakes that build dicts)."""
        return record if isinstance(record, EvalRecord) else cls.from_dict(record, path)


def _read_yaml(store: LocalStorage, key: str) -> dict:
    """A run or checkpoint ``config.yaml`` as a mapping; a damaged one is one line naming it."""
    where = store.path(key)
    try:
        raw = yaml.safe_load(store.read_text(key))
    except UnicodeDecodeError as exc:
        raise CorruptEvalRecord(where, f"not UTF-8 (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise CorruptEvalRecord(where, f"not valid YAML ({getattr(exc, 'problem', None) or type(exc).__name__})") \
            from None
    if not isinstance(raw, dict):
        raise CorruptEvalRecord(where, f"the top level must be a mapping, got {type(raw).__name__}")
    return raw


def checkpoint_config(path: str | Path) -> PipelineConfig:
    """The resolved config a checkpoint (or a run directory) was written with."""
    store = open_storage(path)
    return build_config(_read_yaml(store, RunDir.CONFIG), origin=f"({store.path(RunDir.CONFIG)})")


def run_config(run_dir: str | Path) -> PipelineConfig | None:
    """The run's newest resolved config: run_dir/config.yaml (written at each launch), else the
    newest checkpoint's, else None (nothing launched yet)."""
    run = RunDir(run_dir)
    if run.storage.exists(RunDir.CONFIG):
        return checkpoint_config(run.root)
    found = ckpt.committed_checkpoints(run.checkpoints)
    return checkpoint_config(found[-1].path) if found else None


def is_evaluated(checkpoint_path: str | Path) -> bool:
    return open_storage(checkpoint_path).exists(RunDir.EVAL_JSON)


def write_record(run_dir: str | Path, result: EvalRecord | dict) -> Path | None:
    """Keep ``result`` in the run's eval directory, then (last) as the checkpoint's ``eval.json``.

    Returns the eval.json path, or None when retention deleted the checkpoint meanwhile.
    """
    run = RunDir(run_dir)
    record = EvalRecord.coerce(result)
    text = record.to_json(indent=1)
    path = run.eval_record(record.step)
    open_storage(path.parent).write_atomic(path.name, text)
    if record.checkpoint is None:
        return None
    checkpoint = open_storage(record.checkpoint)
    # retention deletes COMMIT first: without it the checkpoint is gone (or going), and writing
    # eval.json would bring back a directory that holds nothing else
    if not checkpoint.exists(RunDir.COMMIT):
        return None
    checkpoint.write_atomic(RunDir.EVAL_JSON, text)
    return checkpoint.path(RunDir.EVAL_JSON)


def record_of(checkpoint_path: str | Path) -> EvalRecord | None:
    """The eval record of one checkpoint: its eval.json, else the run-level copy, else None."""
    path = Path(checkpoint_path)
    store = open_storage(path)
    if store.exists(RunDir.EVAL_JSON):
        return _read_record(store, RunDir.EVAL_JSON)
    run = RunDir.of_checkpoint(path)
    step = step_of(path.name)
    if run is None or step is None:
        return None
    copy = run.eval_record(step)
    return _read_record(open_storage(copy.parent), copy.name)


def _record_keys(run: RunDir) -> list[tuple[LocalStorage, str]]:
    """(storage, key) of every eval record of the run: the run-level copies first, then the checkpoints'."""
    eval_dir = open_storage(run.eval_dir)
    found = [(eval_dir, name) for name in eval_dir.list() if RunDir.eval_record_step(name) is not None]
    checkpoints = run.checkpoint_storage
    found += [(checkpoints, f"{name}/{RunDir.EVAL_JSON}") for name in checkpoints.children()
              if step_of(name) is not None and checkpoints.exists(f"{name}/{RunDir.EVAL_JSON}")]
    return found


def _read_record(store: LocalStorage, key: str) -> EvalRecord | None:
    try:
        data = store.read_bytes(key)
    except StorageError:
        if store.exists(key):
            raise
        return None  # deleted right now (retention); the other copy has it
    return EvalRecord.from_json(data, str(store.path(key)))


def load_records(run_dir: str | Path) -> list[EvalRecord]:
    """Every evaluated checkpoint of a run, oldest step first (the newest record per step wins)."""
    run = RunDir(run_dir)
    found: dict[int, EvalRecord] = {}
    for store, key in _record_keys(run):
        record = _read_record(store, key)
        if record is not None and (record.step not in found or record.time >= found[record.step].time):
            found[record.step] = record
    return [found[s] for s in sorted(found)]


@contextlib.contextmanager
def eval_lock(run_dir: str | Path, lease_s: float, heartbeat_s: float):
    """Hold a lease on ``RUN_DIR/eval``: one eval job per run at a time (two would race on eval.json
    and on the eval W&B run). Raises EvalError naming the holder."""
    from pipeline.launch.lock import RunLock, read_lease

    lock = RunLock(RunDir(run_dir).eval_lease, lease_s, heartbeat_s, command="pretrain eval")
    try:
        lock.acquire()
    except LockHeld:
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
    store = open_storage(path.parent)
    if not store.exists(path.name):
        return []
    rows = []
    for line in store.read_bytes(path.name).decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
