"""`pretrain status RUN_DIR`: where a run stands, from its files only (no GPU, no W&B, no locks).

Progress counts tokens: ``consumed_samples × seq_len`` of a budget of ``max_steps × global batch ×
seq_len`` (from the run's newest config.yaml, so a resume that raised max_steps moves the budget).
The ETA divides what is left by the mean of the last few ``train/tokens_per_s`` logged.

The phase comes from the run lock and the last records: *running* while a trainer's lease on
run.lock is live (renewed, its process alive); *crashed* when a lease is left behind by a holder
that died (SIGKILL, OOM, power loss: nothing released it); otherwise how the last `pretrain train`
ended, as its holder wrote it (RUN_DIR/last_run.json: finished, stopped, preempted, interrupted,
halted, failed). A run directory without either falls back to the log's age.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from pipeline.eval import EvalError
from pipeline.eval.records import EvalRecord, is_evaluated, load_records, read_jsonl, run_config
from pipeline.rundir import RunDir
from pipeline.train import checkpoint as ckpt
from pipeline.units import format_duration as _format_duration

RECENT_LOGS = 5  # tokens/s entries averaged for the ETA
STALE_AFTER_S = 900  # no log for this long: say so instead of promising an ETA


def eta_seconds(tokens_done: int, tokens_budget: int, tokens_per_s: float | None) -> float | None:
    if tokens_done >= tokens_budget:
        return 0.0
    if not tokens_per_s or tokens_per_s <= 0:
        return None
    return (tokens_budget - tokens_done) / tokens_per_s


def format_duration(seconds: float | None) -> str:
    """`pipeline.units.format_duration`'s ``clock`` style ("3h 01m", "0m 59s", "2d 0h 00m")."""
    return _format_duration(seconds, "clock")


def _phase(done: int, budget: int, metrics: list[dict], last_log: float | None, now: float) -> str:
    if done >= budget:
        return "finished"
    if last_log is not None and now - last_log > STALE_AFTER_S:
        return "stopped or stalled"
    return "running" if metrics else "not started"


def _lease_phase(run: RunDir, now: float) -> tuple[str, str] | None:
    """(phase, detail) from the run lock: running (a live lease) or crashed (a dead holder's)."""
    from pipeline.launch.lock import is_stale, read_lease

    info = read_lease(run.remote or run.root)  # on an object store the lease is the store's object
    if info is None:
        return None
    if not is_stale(info, now, socket.gethostname()):
        return "running", f"trainer {info.describe(now)}"
    return "crashed", (f"its trainer (pid {info.pid} on {info.host}) died without releasing {RunDir.LOCK}: killed, "
                       f"out of memory or lost; `pretrain train` resumes from the newest checkpoint")


def _end_phase(run: RunDir, done: int, budget: int) -> tuple[str, str] | None:
    """(phase, detail) from how the last `pretrain train` ended, as it recorded."""
    from pipeline.launch.preamble import read_run_end

    end = read_run_end(run.root)
    if end is None:
        return None
    ago = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(end.time))
    at = f" at step {end.step}" if end.step is not None else ""
    how = {"preempted": f"preempted by {end.signal}{at}", "interrupted": f"interrupted ({end.signal}){at}",
           "halted": f"halted{at}: {end.message}", "failed": f"failed{at}: {end.message}",
           "stopped": f"stopped{at} (train.stop_at_step, or a late firing)", "finished": f"finished{at}"}
    phase = "finished" if done >= budget else end.outcome
    resume = "" if phase == "finished" else "; `pretrain train` resumes from the newest checkpoint"
    return phase, f"{how.get(end.outcome, end.outcome)} (exit {end.exit_code}, {ago}){resume}"


def _last_eval(records: list[EvalRecord]) -> dict | None:
    if not records:
        return None
    last = records[-1]
    return {"step": last.step, "loss": last.loss, "perplexity": last.perplexity, "tasks": last.tasks,
            "checkpoint": last.checkpoint}


def _progress(newest: ckpt.Committed | None, metrics: list[dict]) -> tuple[int, int, str | None]:
    """(consumed samples, step, the training W&B run id): the newest of the checkpoint and the log."""
    state = newest.state() if newest else None
    logged = [r for r in metrics if "train/consumed_samples" in r]
    consumed = max([state.consumed_samples if state else 0] + [r["train/consumed_samples"] for r in logged])
    step = max([state.step if state else 0] + [r.get("step", 0) for r in logged])
    return consumed, step, state.wandb_run_id if state else None


def run_status(run_dir: str | Path, now: float | None = None) -> dict:
    """Where the run stands, as JSON: phase, progress in tokens, speed and ETA, checkpoints, evals.
    ``run_dir`` may also be one of the run's checkpoint directories."""
    from pipeline.eval.where import run_dir_of

    run = RunDir(run_dir_of(run_dir, "status"))
    now = time.time() if now is None else now
    cfg = run_config(run.root)
    if cfg is None:
        raise EvalError(f"{run.root}: not a run directory (no {RunDir.CONFIG} and no committed checkpoint)")
    newest = ckpt.latest_committed(run.checkpoints, verify=False)
    metrics = read_jsonl(run.metrics)
    consumed, step, wandb_run_id = _progress(newest, metrics)
    rates = [r["train/tokens_per_s"] for r in metrics if "train/tokens_per_s" in r][-RECENT_LOGS:]
    tokens_per_s = sum(rates) / len(rates) if rates else None
    budget = cfg.train.max_steps * cfg.train.global_batch_size * cfg.train.seq_len
    done = consumed * cfg.train.seq_len
    last_log = max((r.get("time", 0) for r in metrics), default=None)
    records = load_records(run.root)
    phase, detail = _lease_phase(run, now) or _end_phase(run, done, budget) or (
        _phase(done, budget, metrics, last_log, now), "")
    if phase != "running" and done >= budget:
        phase = "finished"
    if phase == "running" and last_log is not None and now - last_log > STALE_AFTER_S:
        detail += f"; but nothing logged for {format_duration(now - last_log)}: stalled?"
    return {
        "run_dir": str(run.root), "name": cfg.name, "arch": cfg.model.arch, "phase": phase, "phase_detail": detail,
        "step": step, "max_steps": cfg.train.max_steps,
        "tokens_done": done, "tokens_budget": budget, "progress": min(done / budget, 1.0),
        "tokens_per_s": tokens_per_s,
        "eta_s": eta_seconds(done, budget, tokens_per_s) if phase in ("running", "finished") else None,
        "last_log_age_s": None if last_log is None else round(now - last_log, 1),
        "checkpoint": None if newest is None else {"step": newest.step, "path": str(newest.path)},
        "last_eval": _last_eval(records),
        "eval_pending_steps": [c.step for c in ckpt.committed_checkpoints(run.checkpoints)
                               if not is_evaluated(c.path)],
        "wandb_run_id": wandb_run_id,
        "eval_wandb_run_ids": sorted({r.wandb_run_id for r in records if r.wandb_run_id}),
    }


def format_status(s: dict) -> str:
    ck = s["checkpoint"]
    detail = s.get("phase_detail")
    lines = [
        f"run:         {s['name']} ({s['arch']}) at {s['run_dir']}: {s['phase']}" + (f": {detail}" if detail else ""),
        f"progress:    step {s['step']:,} of {s['max_steps']:,}; {s['tokens_done']:,} of {s['tokens_budget']:,} "
        f"tokens ({s['progress'] * 100:.1f}%)",
        "speed:       " + (f"{s['tokens_per_s']:,.0f} tokens/s (mean of the last {RECENT_LOGS} logs); "
                            + (f"ETA {format_duration(s['eta_s'])}" if s["phase"] in ("running", "finished", "not started")
                               or s["eta_s"] is not None else "no ETA: not running")
                            if s["tokens_per_s"] else "no throughput logged yet")
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
