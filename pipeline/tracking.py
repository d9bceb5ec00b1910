"""Experiment tracking: W&B behind a two-method interface, plus a local metrics.jsonl always.

W&B is imported lazily and runs offline when no API key is configured, so a laptop, CI and an
air-gapped cluster all work; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later.
Only rank 0 creates a tracker; other ranks get `NullTracker`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.config import PipelineConfig

_SECRET_MARKERS = ("key", "token", "secret", "password")


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def public_config(cfg: PipelineConfig) -> dict:
    """The resolved config for W&B, with anything that looks like a secret removed."""

    def scrub(node):
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if not any(m in k.lower() for m in _SECRET_MARKERS)}
        return node

    return scrub(cfg.model_dump(mode="json"))


class NullTracker:
    run_id: str | None = None
    run_dir: str | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker:
    """Rank-0 tracker: ``log(metrics, step)`` goes to metrics.jsonl and to W&B."""

    def __init__(
        self,
        cfg: PipelineConfig,
        metrics_path: Path,
        job_type: str,
        run_id: str | None = None,
        step_metric: str | None = None,
    ):
        self.metrics_path = Path(metrics_path)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        self._wandb = None
        self.run_id = run_id
        self.run_dir = None
        self.step_metric = step_metric
        mode = resolve_mode(cfg.tracking.mode)
        if mode == "disabled":
            return
        import wandb

        wandb_dir = Path(cfg.run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
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

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is None:
            return
        if self.step_metric:  # e.g. eval: plotted against the checkpoint's training step
            self._wandb.log({self.step_metric: step, **metrics})
        else:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
