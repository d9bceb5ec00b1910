"""`pretrain status RUN_DIR`: where a run stands, from its files only (no GPU, no W&B, no locks).

Progress counts tokens: ``consumed_samples × seq_len`` of a budget of ``max_steps × global batch ×
seq_len`` (from the run's newest config.yaml, so a resume that raised max_steps moves the budget).
The ETA divides what is left by the mean of the last few ``train/tokens_per_s`` logged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.eval import EvalError
from pipeline.eval.records import load_records, read_jsonl, run_config
from pipeline.train import checkpoint as ckpt

RECENT_LOGS = 5  # tokens/s entries averaged for the ETA
STALE_AFTER_S = 900  # no log for this long: say so instead of promising an ETA


def eta_seconds(tokens_done: int, tokens_budget: int, tokens_per_s: float | None) -> float | None:
    if tokens_done >= tokens_budget:
        return 0.0
    if not tokens_per_s or tokens_per_s <= 0:
        return None
    return (tokens_budget - tokens_done) / tokens_per_s


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{days}d " if days else "") + (f"{h}h {m:02d}m" if days or h else f"{m}m {s:02d}s")


def run_status(run_dir: str | Path, now: float | None = None) -> dict:
    
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    cfg = run_config(run_dir)
    if cfg is None:
        raise EvalError(f"{run_dir}: not a run directory (no config.yaml and no committed checkpoint)")
    seq_len, batch = cfg.train.seq_len, cfg.train.global_batch_size
    newest = ckpt.latest_committed(run_dir / "checkpoints", verify=False)
    state = newest.trainer_state() if newest else {}
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    logged = [r for r in metrics if "train/consumed_samples" in r]
    consumed = max([state.get("consumed_samples", 0)] + [r["train/consumed_samples"] for r in logged])
    step = max([state.get("step", 0)] + [r.get("step", 0) for r in logged])
    rates = [r["train/tokens_per_s"] for r in metrics if "train/tokens_per_s" in r][-RECENT_LOGS:]
    tokens_per_s = sum(rates) / len(rates) if rates else None
    budget = cfg.train.max_steps * batch * seq_len
    done = consumed * seq_len
    last_log = max((r.get("time", 0) for r in metrics), default=None)
    records = load_records(run_dir)
    pending = [c.step for c in ckpt.committed_checkpoints(run_dir / "checkpoints")
               if not (c.path / "eval.json").is_file()]
    if done >= budget:
        phase = "finished"
    elif last_log is not None and now - last_log > STALE_AFTER_S:
        phase = "stopped or stalled"
    else:
        phase = "running" if metrics else "not started"
    eta = eta_seconds(done, budget, tokens_per_s) if phase in ("running", "finished") else None
    return {
        "run_dir": str(run_dir), "name": cfg.name, "arch": cfg.model.arch, "phase": phase,
        "step": step, "max_steps": cfg.train.max_steps,
        "tokens_done": done, "tokens_budget": budget, "progress": min(done / budget, 1.0),
        "tokens_per_s": tokens_per_s, "eta_s": eta,
        "last_log_age_s": None if last_log is None else round(now - last_log, 1),
        "checkpoint": None if newest is None else {"step": newest.step, "path": str(newest.path)},
        "last_eval": None if not records else {
            k: records[-1].get(k) for k in ("step", "loss", "perplexity", "tasks", "checkpoint")},
        "eval_pending_steps": pending,
        "wandb_run_id": state.get("wandb_run_id"),
        "eval_wandb_run_ids": sorted({r["wandb_run_id"] for r in records if r.get("wandb_run_id")}),
    }


def format_status(s: dict) -> str:
    ck = s["checkpoint"]
    lines = [
        f"run:         {s['name']} ({s['arch']}) at {s['run_dir']}: {s['phase']}",
        f"progress:    step {s['step']:,} of {s['max_steps']:,}; {s['tokens_done']:,} of {s['tokens_budget']:,} "
        f"tokens ({s['progress'] * 100:.1f}%)",
        "speed:       " + (f"{s['tokens_per_s']:,.0f} tokens/s (mean of the last {RECENT_LOGS} logs); "
                            f"ETA {format_duration(s['eta_s'])}" if s["tokens_per_s"] else "no throughput logged yet")
        + (f"; last log {format_duration(s['last_log_age_s'])} ago" if s["last_log_age_s"] is not None else ""),
        "checkpoint:  " + (f"step {ck['step']:,} → {ck['path']}" if ck else "none committed yet"),
    ]
    ev = s["last_eval"]
    if ev:
        tasks = "".join(f", {n} acc {m.get('acc', float('nan')):.3f}" for n, m in (ev.get("tasks") or {}).items())
        lines.append(f"last eval:   step {ev['step']:,}: validation loss {ev['loss']:.4f}, perplexity "
                     f"{ev['perplexity']:.2f}{tasks}")
    else:
        lines.append("last eval:   none yet (`pretrain eval RUN_DIR`, or `--watch` beside training)")
    if s["eval_pending_steps"]:
        lines.append(f"not evaluated: steps {', '.join(map(str, s['eval_pending_steps']))}")
    evals = ", ".join(s["eval_wandb_run_ids"]) or "none"
    lines.append(f"W&B:         train run {s['wandb_run_id']}, eval runs {evals}")
    return "\n".join(lines)


def print_status(run_dir: str | Path, as_json: bool = False) -> dict:
    status = run_status(run_dir)
    print(json.dumps(status, indent=1) if as_json else format_status(status))
    return status
