"""`pretrain demo`: the whole flow, offline, on the embedded standard-library corpus."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import PipelineConfig, load_config
from pipeline.rundir import DatasetDir, RunDir

if TYPE_CHECKING:
    from pipeline.eval.records import EvalRecord


def run_demo(run_dir: str, overrides: list[str], config_path: Path) -> int:
    from pipeline.data.demo_corpus import write_demo_corpus
    from pipeline.data.prepare import prepare
    from pipeline.eval.evaluate import evaluate
    from pipeline.eval.report import write_report
    from pipeline.launch import local
    from pipeline.train.console import STARTED_ENV

    run = Path(run_dir)
    corpus = run / "corpus" / "python-stdlib-docs.jsonl"
    cfg = load_config(config_path, [
        f"run_dir={run}", f"data.output_dir={run / 'data'}",
        f"data.sources=[{{path: '{corpus}', text_field: text}}]", *overrides,
    ])
    cfg.gradient_accumulation_steps(cfg.train.nproc_per_node)
    n_docs = write_demo_corpus(corpus)
    print(f"demo: corpus of {n_docs} standard-library docstrings → {corpus}")

    prepare(cfg.data)
    if "ray" in sys.modules:  # prepare ran on Ray (the local executor does not import it)
        sys.modules["ray"].shutdown()  # free the cores for training
    os.environ[STARTED_ENV] = repr(time.time())  # train's start-up line times from here
    try:
        code = local.run_torchrun(cfg) if cfg.train.nproc_per_node > 1 else (local.run_single_process(cfg) and 0)
    finally:
        os.environ.pop(STARTED_ENV, None)
    if code:
        print(f"demo: training failed with exit code {code}")
        return code
    result = evaluate(cfg.run_dir)
    report = write_report(cfg.run_dir)
    print(_summary(cfg, result, report))
    return 0


def _summary(cfg: PipelineConfig, result: EvalRecord, report: Path) -> str:
    """Where everything the demo made is, and how far validation loss fell."""
    from pipeline.eval.records import read_jsonl

    run = RunDir(cfg.run_dir)
    metrics = read_jsonl(run.metrics)
    first = next(m["val/loss"] for m in metrics if m["step"] == 0 and "val/loss" in m)
    wandb_dirs = sorted(str(p) for p in run.wandb.glob("*run-*"))
    shards = f"{cfg.data.output_dir}/{{{','.join(DatasetDir.SPLITS)}}}/<source>-NNNNN.{{bin,idx}}"
    return "\n".join([
        "",
        f"demo finished: validation loss {first:.3f} at step 0 → {result.loss:.3f} at step "
        f"{result.step} (perplexity {result.perplexity:.1f})",
        f"  shards:       {shards} ({DatasetDir.MANIFEST})",
        f"  checkpoints:  {run.checkpoints} (newest: {result.checkpoint})",
        f"  eval results: {Path(result.checkpoint) / RunDir.EVAL_JSON}",
        f"  metrics:      {run.metrics}",
        f"  W&B runs:     {', '.join(wandb_dirs) or 'disabled'}",
        f"                (offline unless WANDB_API_KEY is set; upload with `wandb sync DIR`)",
        f"  report:       {report} (and {report.with_suffix('.png').name}; open it in a browser, offline)",
    ])
