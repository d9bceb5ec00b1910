"""`pretrain demo`: the whole flow, offline, on the embedded standard-library corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.config import load_config


def run_demo(run_dir: str, overrides: list[str], config_path: Path) -> int:
    from pipeline.data.demo_corpus import write_demo_corpus
    from pipeline.data.prepare import prepare
    from pipeline.eval.evaluate import evaluate
    from pipeline.eval.report import write_report
    from pipeline.launch import local

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
    code = local.run_torchrun(cfg) if cfg.train.nproc_per_node > 1 else (local.run_single_process(cfg) and 0)
    if code:
        print(f"demo: training failed with exit code {code}")
        return code
    result = evaluate(cfg.run_dir)
    report = write_report(cfg.run_dir)

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(m["val/loss"] for m in metrics if m["step"] == 0 and "val/loss" in m)
    wandb_dirs = sorted(str(p) for p in (run / "wandb").glob("*run-*"))
    print("\n".join([
        "",
        f"demo finished: validation loss {first:.3f} at step 0 → {result['loss']:.3f} at step "
        f"{result['step']} (perplexity {result['perplexity']:.1f})",
        f"  shards:       {cfg.data.output_dir}/{{train,validation}}/<source>-NNNNN.{{bin,idx}} (manifest.json)",
        f"  checkpoints:  {run / 'checkpoints'} (newest: {result['checkpoint']})",
        f"  eval results: {Path(result['checkpoint']) / 'eval.json'}",
        f"  metrics:      {run / 'metrics.jsonl'}",
        f"  W&B runs:     {', '.join(wandb_dirs) or 'disabled'}",
        f"                (offline unless WANDB_API_KEY is set; upload with `wandb sync DIR`)",
        f"  report:       {report} (and {report.with_suffix('.png').name}; open it in a browser, offline)",
    ]))
    return 0
