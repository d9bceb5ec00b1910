"""Experiment tracking: W&B behind a two-method interface, plus a local metrics.jsonl always.

W&B is imported lazily and runs offline when no API key is configured, so a laptop, CI and an
air-gapped cluster all work; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later.
Only rank 0 creates a tracker; other ranks get `NullTracker`.

One dashboard per training run: every W&B run of its group logs ``train/step`` (the training step;
for an eval, the step of the checkpoint it scored) and defines it as the step metric of all its
metrics, so train loss, validation loss and every eval metric share one x-axis. All eval jobs of a
training run resume one eval run whose id is derived from the training run's (`eval_run_id`).
Lineage is logged as artifacts by reference (nothing uploaded): the training run uses the dataset
(its manifest and tokenizer) and outputs each committed checkpoint; eval and export runs use the
checkpoint and output the eval record and the transformers export.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.rundir import DatasetDir, RunDir, step_of, tag_for
from pipeline.storage import open_storage

STEP_METRIC = "train/step"  # the x-axis of every run of a training run's W&B group
TRAIN_JOB = "train"

# A name is secret-like when one of its words (split at _ - . and spaces) is one of these: so
# WANDB_API_KEY and hf_token are, while data.tokenizer and warmup_tokens are not.
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})
REDACTED = "<redacted>"


def is_secret_name(name: str) -> bool:
    return any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", name.lower()))


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _secret_values() -> list[str]:
    """Values of environment variables named like secrets (WANDB_API_KEY, HF_TOKEN, ...)."""
    return [v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 16]


def public_config(cfg: PipelineConfig) -> dict:
    """The resolved config for W&B: keys that look like secrets dropped, and any value that contains
    a secret from the environment (e.g. the W&B API key pasted into a field) redacted."""
    secrets = _secret_values()

    def scrub(node):
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if not is_secret_name(k)}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if isinstance(node, str) and any(s in node for s in secrets):
            return REDACTED
        return node

    return scrub(cfg.model_dump(mode="json"))


def _safe(name: str) -> str:
    """A W&B artifact or run name from free text: letters, digits and ``_ . -`` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "unnamed"


def _base_id(train_run_id: str | None, run_dir: str | Path) -> str:
    if train_run_id:
        return train_run_id
    # trained without W&B: the run directory names the run
    where = str(run_dir).rstrip("/") if "://" in str(run_dir) else str(Path(run_dir).resolve())  # a URI as it is
    return "run-" + hashlib.sha256(where.encode()).hexdigest()[:12]


def eval_run_id(train_run_id: str | None, run_dir: str | Path) -> str:
    """The id of the one W&B run every eval job of a training run resumes."""
    return f"{_base_id(train_run_id, run_dir)}-eval"


def export_run_id(train_run_id: str | None, run_dir: str | Path) -> str:
    return f"{_base_id(train_run_id, run_dir)}-export"


def artifact_name(kind: str, train_run_id: str | None, run_dir: str | Path) -> str:
    """``checkpoint-ID``, ``eval-ID``, ``hf-ID``: one artifact per kind per training run, one version
    per checkpoint (aliased with its tag)."""
    return f"{kind}-{_base_id(train_run_id, run_dir)}"


def _reference_artifact(name: str, kind: str, root: Path, keys: list[str], hashed: set[str],
                        metadata: dict):
    """An artifact of references to ``root/KEY`` files (no upload). Only ``hashed`` keys are read
    for their md5 (small files that name the content: COMMIT, manifest.json); the others are
    referenced by path and size, so weights and shards are never read for it."""
    import wandb

    store = open_storage(root)
    artifact = wandb.Artifact(name, type=kind, metadata=metadata)
    for key in keys:
        artifact.add_reference(store.local_path(key).resolve().as_uri(), name=key, checksum=key in hashed)
    return artifact


def dataset_artifact(data_dir: str | Path):
    """The prepared dataset: its manifest (the sha256 of every shard) and tokenizer."""
    store = open_storage(data_dir)
    keys = [k for k in (DatasetDir.MANIFEST, DatasetDir.TOKENIZER) if store.exists(k)]
    if DatasetDir.MANIFEST not in keys:
        raise FileNotFoundError(f"{store.path(DatasetDir.MANIFEST)}: missing")
    return _reference_artifact(f"dataset-{_safe(Path(data_dir).resolve().name)}", "dataset",
                               Path(data_dir), keys, set(keys), {"path": str(data_dir)})


def checkpoint_artifact(path: str | Path, train_run_id: str | None, run_dir: str | Path):
    """A committed checkpoint: every file its COMMIT lists, and COMMIT itself (hashed: it holds the
    sha256 of the others). The eval record written later is not part of it, so the training run
    and every eval job build the same artifact, and W&B sees one version per checkpoint."""
    path = Path(path)
    step = step_of(path.name)
    keys = [k for k in open_storage(path).list() if k != RunDir.EVAL_JSON]
    if RunDir.COMMIT not in keys:
        raise FileNotFoundError(f"{path / RunDir.COMMIT}: missing (not committed, or deleted by retention)")
    return _reference_artifact(artifact_name("checkpoint", train_run_id, run_dir), "model", path, keys,
                               {RunDir.COMMIT}, {"step": step, "path": str(path.resolve()), "training_run": train_run_id})


def _try(what: str, action) -> None:
    """Lineage is an extra: a checkpoint deleted meanwhile must not stop training or an eval."""
    try:
        action()
    except (OSError, ValueError) as exc:
        print(f"tracking: {what} not logged to W&B: {exc}", file=sys.stderr)


def _init_wandb(cfg: PipelineConfig, job_type: str, run_id: str | None, mode: str):
    import wandb

    wandb_dir = RunDir(cfg.run_dir).root  # wandb.init adds its own wandb/ below it
    open_storage(wandb_dir).makedirs()
    run = wandb.init(
        project=cfg.tracking.project,
        group=cfg.tracking.group or cfg.name,
        name=f"{cfg.name}-{job_type}",
        job_type=job_type,
        id=run_id,
        resume="allow" if run_id else None,
        dir=str(wandb_dir),
        mode=mode,
        config=public_config(cfg),
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    run.define_metric(STEP_METRIC)
    run.define_metric("*", step_metric=STEP_METRIC)
    return run


def _use(run, artifact) -> None:
    """Mark ``artifact`` as an input of ``run``. Offline, W&B refuses ``use_artifact``; what it does
    online for a new artifact (log it, then use it once committed) is recorded instead, and
    ``wandb sync`` replays it: the same digest is the same version the producing run logged."""
    if run.offline:
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def use_checkpoint(run, path: str | Path, train_run_id: str | None, run_dir: str | Path) -> None:
    """The checkpoint at ``path`` (trained by ``train_run_id``) is an input of ``run``."""
    _try(f"checkpoint {Path(path).name}", lambda: _use(run, checkpoint_artifact(path, train_run_id, run_dir)))


def log_output(run, name: str, kind: str, root: str | Path, keys: list[str], step: int,
               metadata: dict | None = None) -> None:
    """Files ``run`` produced (``root/KEY``, by reference) as a version of artifact ``name``, aliased
    with the checkpoint's tag; every file but the weights is hashed."""
    hashed = {k for k in keys if not k.endswith(".safetensors")}
    _try(name, lambda: run.log_artifact(_reference_artifact(
        _safe(name), kind, Path(root), keys, hashed, {"step": step, **(metadata or {})}), aliases=[tag_for(step)]))


def log_export(cfg: PipelineConfig, checkpoint: str | Path, train_run_id: str | None, out_dir: str | Path,
               step: int) -> str | None:
    """`pretrain export`'s W&B run (one per training run, resumed by every export): it uses the
    checkpoint and outputs the exported directory. Returns the run id, None with tracking disabled."""
    mode = resolve_mode(cfg.tracking.mode)
    if mode == "disabled":
        return None
    run = _init_wandb(cfg, "export", export_run_id(train_run_id, cfg.run_dir), mode)
    try:
        use_checkpoint(run, checkpoint, train_run_id, cfg.run_dir)
        out = open_storage(out_dir)
        log_output(run, artifact_name("hf", train_run_id, cfg.run_dir), "model", out_dir, out.list(), step,
                   {"path": str(out_dir), "checkpoint": str(checkpoint)})
        return run.id
    finally:
        run.finish()


class TrackerStart:
    """A tracker built in a background thread, so that W&B's start (its import and its service
    process, seconds) overlaps the engine's build. ``result()`` waits for it and raises whatever the
    start raised, as building it in place would have; nothing is logged before ``result()`` returns."""

    def __init__(self, build):
        self._tracker, self._error = None, None
        self._thread = threading.Thread(target=self._build, args=(build,), name="tracker-start", daemon=True)
        self._thread.start()

    def _build(self, build) -> None:
        try:
            self._tracker = build()
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._tracker


class NullTracker:
    run_id: str | None = None
    run_dir: str | None = None

    def log(self, metrics: dict, step: int, tables: dict | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker:
    """Rank-0 tracker: ``log(metrics, step)`` goes to metrics.jsonl and to W&B.

    ``metrics_path`` is one of the run's logs (`RunDir.metrics`, `RunDir.eval_metrics`); each row is
    appended through the storage layer and is on disk when ``log`` returns.

    Every row carries ``train/step`` = ``step``. W&B's own ``_step`` must grow across every job that
    writes to the run: the training run's is the training step (a resumed run continues past its
    checkpoint). A run given ``step_metric`` (eval: ``step`` is the checkpoint's, which a later job
    may evaluate again, or out of order) numbers its rows instead, continuing after the rows already
    in ``metrics_path``: an offline run resumed by a later job starts its ``_step`` at 0 again, and
    rows that reuse a ``_step`` would be dropped by ``wandb sync``.

    The training run (``job_type`` train) also records its lineage: it uses the dataset, and logs
    each checkpoint committed while it runs (found when it logs, and when it closes)."""

    def __init__(
        self,
        cfg: PipelineConfig,
        metrics_path: Path,
        job_type: str,
        run_id: str | None = None,
        step_metric: str | None = None,
    ):
        self.metrics_path = Path(metrics_path)
        self._log_store = open_storage(self.metrics_path.parent)
        self._row = self._rows_so_far() if step_metric else None
        self._log_store.append_text(self.metrics_path.name, "")  # the log exists from the start
        self._wandb = None
        self.run_id = run_id
        self.run_dir = None
        self.step_metric = step_metric
        self.cfg = cfg
        self._checkpoints: set[str] | None = None  # training: the checkpoints already logged
        mode = resolve_mode(cfg.tracking.mode)
        if mode == "disabled":
            return
        self._wandb = _init_wandb(cfg, job_type, run_id, mode)
        self.run_id = self._wandb.id
        self.run_dir = self._wandb.dir
        if job_type == TRAIN_JOB:
            self._checkpoints = set()
            _try("the dataset", lambda: _use(self._wandb, dataset_artifact(DatasetDir(cfg.data.output_dir).root)))

    def _rows_so_far(self) -> int:
        store, key = self._log_store, self.metrics_path.name
        return store.read_bytes(key).count(b"\n") if store.exists(key) else 0

    def log(self, metrics: dict, step: int, tables: dict[str, tuple[list, list[list]]] | None = None) -> None:
        """Scalars to metrics.jsonl and W&B; ``tables`` ({key: (columns, rows)}) to W&B only, as a
        wandb.Table logged whole each time (W&B keeps every version; the newest is the complete one)."""
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._log_store.append_text(self.metrics_path.name, json.dumps(record) + "\n")
        if self._wandb is None:
            return
        payload = {STEP_METRIC: step, **metrics}
        if tables:
            import wandb

            payload.update({key: wandb.Table(columns=list(cols), data=[list(r) for r in rows])
                            for key, (cols, rows) in tables.items()})
        if self._row is None:
            self._wandb.log(payload, step=step)
        else:  # numbered rows, continuing the previous jobs' (and the server's, when online)
            self._row = max(self._row, self._wandb.step)
            self._wandb.log(payload, step=self._row)
            self._row += 1
        self._log_new_checkpoints()

    def _log_new_checkpoints(self) -> None:
        """Training: each committed checkpoint not logged yet becomes a version of the run's
        checkpoint artifact, aliased with its tag (step_00000100)."""
        if self._checkpoints is None:
            return
        run = RunDir(self.cfg.run_dir)
        store = run.checkpoint_storage
        for tag in store.children():
            if tag in self._checkpoints or step_of(tag) is None or not store.exists(f"{tag}/{RunDir.COMMIT}"):
                continue
            self._checkpoints.add(tag)
            _try(f"checkpoint {tag}", lambda: self._wandb.log_artifact(
                checkpoint_artifact(store.path(tag), self.run_id, run.root), aliases=[tag]))

    def use_checkpoint(self, path: str | Path, train_run_id: str | None, run_dir: str | Path) -> None:
        """Eval: the checkpoint it scored is an input of this run."""
        if self._wandb is not None:
            use_checkpoint(self._wandb, path, train_run_id, run_dir)

    def log_output(self, name: str, kind: str, root: str | Path, keys: list[str], step: int,
                   metadata: dict | None = None) -> None:
        if self._wandb is not None:
            log_output(self._wandb, name, kind, root, keys, step, metadata)

    def close(self) -> None:
        if self._wandb is not None:
            self._log_new_checkpoints()
            self._wandb.finish()
            self._wandb = None
