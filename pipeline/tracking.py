"""Experiment tracking: W&B behind a two-method interface, plus a local metrics.jsonl always.

W&B is imported lazily and runs offline when no API key is configured, so a laptop, CI and an
air-gapped cluster all work; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later.
Only rank 0 creates a tracker; other ranks get `NullTracker`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.rundir import RunDir
from pipeline.storage import open_storage

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
    appended through the storage layer and is on disk when ``log`` returns."""

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
        self._log_store.append_text(self.metrics_path.name, "")  # the log exists from the start
        self._wandb = None
        self.run_id = run_id
        self.run_dir = None
        self.step_metric = step_metric
        mode = resolve_mode(cfg.tracking.mode)
        if mode == "disabled":
            return
        import wandb

        wandb_dir = RunDir(cfg.run_dir).root  # wandb.init adds its own wandb/ below it
        open_storage(wandb_dir).makedirs()
        self._wandb = wandb.init(
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
        if step_metric:
            self._wandb.define_metric(step_metric)
            self._wandb.define_metric("*", step_metric=step_metric)
        self.run_id = self._wandb.id
        self.run_dir = self._wandb.dir

    def log(self, metrics: dict, step: int, tables: dict[str, tuple[list, list[list]]] | None = None) -> None:
        """Scalars to metrics.jsonl and W&B; ``tables`` ({key: (columns, rows)}) to W&B only, as a
        wandb.Table logged whole each time (W&B keeps every version; the newest is the complete one)."""
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._log_store.append_text(self.metrics_path.name, json.dumps(record) + "\n")
        if self._wandb is None:
            return
        payload = dict(metrics)
        if tables:
            import wandb

            payload.update({key: wandb.Table(columns=list(cols), data=[list(r) for r in rows])
                            for key, (cols, rows) in tables.items()})
        if self.step_metric:  # e.g. eval: plotted against the checkpoint's training step
            self._wandb.log({self.step_metric: step, **payload})
        else:
            self._wandb.log(payload, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
