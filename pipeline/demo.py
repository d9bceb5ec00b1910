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

    from pipeline.data.staging import push_dataset
    from pipeline.launch.preamble import push_outputs, stage_inputs
    from pipeline.train.remote import push_run

    here = RunDir(run_dir)  # an s3:// run: the corpus is written into this node's mirror of it
    corpus = here.root / "corpus" / "python-stdlib-docs.jsonl"
    data_dir = f"{here.remote}/data" if here.remote else Path(run_dir) / "data"
    cfg = load_config(config_path, [
        f"run_dir={run_dir}", f"data.output_dir={data_dir}",
        f"data.sources=[{{path: '{corpus}', text_field: text}}]", *overrides,
    ])
    cfg.gradient_accumulation_steps(cfg.train.nproc_per_node)
    n_docs = write_demo_corpus(corpus)
    print(f"demo: corpus of {n_docs} standard-library docstrings → {corpus}")

    prepare(cfg.data)
    push_dataset(DatasetDir(cfg.data.output_dir))  # on an object store: shards, then the manifest
    stage_inputs(cfg)
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
    push_outputs(cfg)
    result = evaluate(here.root)
    report = write_report(here.root)
    push_run(here)
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
        f"  checkpoints:  {run.where(RunDir.CHECKPOINTS)} (newest: {Path(result.checkpoint).name})",
        f"  eval results: {run.where(f'{RunDir.CHECKPOINTS}/{Path(result.checkpoint).name}/{RunDir.EVAL_JSON}')}",
        f"  metrics:      {run.where(RunDir.METRICS)}",
        f"  W&B runs:     {', '.join(wandb_dirs) or 'disabled'}",
        f"                (offline unless WANDB_API_KEY is set; upload with `wandb sync DIR`)",
        f"  report:       {run.where(report.name)} (and {report.with_suffix('.png').name}; open it in a browser, "
        f"offline)" + (f"\n  this node's copy of the run: {run.root}" if run.remote else ""),
    ])
