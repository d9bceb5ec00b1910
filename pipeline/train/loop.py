"""`pretrain train` on every rank: verify data → build → resume → step → guard → log → checkpoint.

One optimizer step: for each micro-batch, read this rank's samples (a pure function of
``consumed_samples``), forward, backward; before the last backward all ranks agree, in one small
all-reduce, on the step's loss, whether any loss was non-finite, whether a preemption signal
arrived and whether a time-based save is due. The guards (guards.py) may then reject the step,
which DeepSpeed discards without touching weights or optimizer moments. `SavePolicy` decides after
each step whether a checkpoint is due; save and resume themselves live in resume.py.

A loss-spike rollback rebuilds the engine from the newest committed checkpoint in the same
process (the resume path, so it is exact) with the spiking batches marked as never to be trained on.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError, PipelineConfig
from pipeline.data.eras import Era
from pipeline.data.loader import BlendedSamples, open_split, rank_positions
from pipeline.data.manifest import Manifest, manifest_sha256, verify_manifest
from pipeline.models import initial_model
from pipeline.models.flops import param_count, train_flops_per_token
from pipeline.progress import ProgressLine
from pipeline.rundir import DatasetDir, RunDir
from pipeline.units import format_duration
from pipeline.tracking import NullTracker, Tracker, TrackerStart
from pipeline.train import checkpoint as ckpt
from pipeline.train import console
from pipeline.train import guards, metrics, resume
from pipeline.train import state as st
from pipeline.train.engine import init_distributed, initialize, loss_scale, resolve_model_config
from pipeline.train.preemption import Preemption, mark_ready
from pipeline.train.restarts import count_start, record_restart
from pipeline.train.schedule import Schedule, describe_change, resumed


def _all_mean(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.detach().float().cpu().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def validation_loss(engine, data: BlendedSamples, cfg: PipelineConfig, rank: int, world: int) -> float:
    """Mean loss over the first ``eval.max_samples`` positions of the blended validation stream."""
    micro = cfg.eval.micro_batch_size
    size = sum(len(s) for s in data.sources)
    n = min(size, cfg.eval.max_samples or size)
    per_round = micro * world
    rounds = max(1, n // per_round)  # every rank runs the same number of forwards (ZeRO-3 gathers)
    total = torch.zeros(())
    engine.eval()
    with torch.no_grad():
        for r in range(rounds):
            batch = data.batch(*data.ids(rank_positions(r * per_round, 0, rank, world, micro))).to(engine.device)
            total += engine(*batch, doc_ids=batch.doc_ids).float().cpu()  # doc_ids: data.document_masking
    engine.train()
    return _all_mean(total / rounds)


@dataclass
class Run:
    """What stays the same across rollback attempts of one `train()` call."""

    cfg: PipelineConfig
    rank: int
    world: int
    say: object
    manifest: Manifest
    manifest_sha: str
    train_data: BlendedSamples
    val_data: BlendedSamples
    preemption: Preemption
    faults: guards.Faults
    tracker: Tracker | NullTracker | None = None
    pending_skips: list[list[int]] = field(default_factory=list)  # rollbacks not yet in a checkpoint
    hold: object = None  # () -> int | None: retention's hold for a live eval job (launch/preamble.py)
    phases: console.Phases = field(default_factory=console.Phases)  # start-up times, said once
    tracker_start: TrackerStart | None = None  # rank 0's tracker, built while the engine is
    line: ProgressLine | None = None  # rank 0 on a terminal: the step line refreshed between log lines

    def start_tracker(self, run_id: str | None) -> None:
        """Rank 0 starts its tracker (W&B) in the background once the resumed run's id is known."""
        if self.tracker is not None or self.tracker_start is not None:
            return
        run_dir = RunDir(self.cfg.run_dir)
        run_dir.storage.makedirs()
        if self.rank != 0:
            self.tracker = NullTracker()
            return
        self.tracker_start = TrackerStart(lambda: Tracker(self.cfg, run_dir.metrics, "train", run_id=run_id))

    def tracker_ready(self) -> Tracker | NullTracker:
        if self.tracker is None:
            self.tracker = self.tracker_start.result()
        return self.tracker


@dataclass
class Verdict:
    """What all ranks agreed on before the last backward of a step."""

    loss: float  # mean over ranks and micro-batches (NaN when any was non-finite)
    nonfinite: bool
    preempt: bool
    save_due: bool
    spike: bool = False
    zscore: float = 0.0
    rollback: list[int] | None = None  # spike_action rollback: [start, end) sample positions to skip


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step came to, for `_Attempt.account`."""

    verdict: Verdict
    lr: float
    grad_norm: float | None = None
    skipped: bool = False  # the update was discarded (DeepSpeed's overflow skip or the ZeRO-0 hold)


@dataclass(frozen=True)
class Save:
    """A save that is due: ``validate`` first or not, and whether training stops after it."""

    validate: bool
    stop: bool


class SavePolicy:
    """When a checkpoint is written, in one place: at the end step, every
    ``checkpoint.save_interval_steps``, when ``checkpoint.save_interval_minutes`` passed on rank 0's
    clock (all ranks agree on it in the step's all-reduce), and at once, without validation, when a
    preemption signal arrived."""

    def __init__(self, cfg: PipelineConfig, end_step: int, rank: int):
        self.end_step, self.rank = end_step, rank
        self.interval_steps = cfg.checkpoint.save_interval_steps
        self.interval_minutes = cfg.checkpoint.save_interval_minutes
        self.last_save = time.monotonic()

    def clock_due(self) -> bool:
        """This rank's vote on a time-based save (only rank 0's clock counts)."""
        return self.rank == 0 and self.interval_minutes is not None and \
            time.monotonic() - self.last_save >= 60 * self.interval_minutes

    def due(self, step: int, verdict: Verdict) -> Save | None:
        """After step ``step`` was trained: the save it calls for, if any. A preemption that falls
        on a regular save step still validates (that step's val/loss is part of the run's record)."""
        regular = step == self.end_step or verdict.save_due or bool(
            self.interval_steps and step % self.interval_steps == 0)
        if verdict.preempt:
            return Save(validate=regular, stop=True)
        return Save(validate=True, stop=False) if regular else None

    def saved(self) -> None:
        self.last_save = time.monotonic()


def _agree(engine, losses: list[torch.Tensor], preempt: bool, save_due: bool) -> tuple[float, bool, bool, bool]:
    import torch.distributed as dist

    stacked = torch.stack(losses).double()
    finite = torch.isfinite(stacked)
    t = torch.stack([torch.where(finite, stacked, 0.0).sum(), (~finite).sum().double(),
                     torch.tensor(float(preempt), dtype=torch.float64, device=stacked.device),
                     torch.tensor(float(save_due), dtype=torch.float64, device=stacked.device)])
    dist.all_reduce(t)
    total, bad, pre, due = t.tolist()
    n = len(losses) * dist.get_world_size()
    return (total / n if not bad else math.nan), bad > 0, pre > 0, due > 0


@dataclass
class Outcome:
    state: st.TrainState
    preempted: bool = False
    rollback: list[int] | None = None  # [start, end) sample positions to skip, then try again


def _build(run: Run) -> tuple[object, st.TrainState, object, object]:
    """Model + engine, resumed from the newest committed checkpoint when there is one; the last is
    the resumed checkpoint's TrainerState (None for a fresh start)."""
    import torch.distributed as dist

    cfg, rank, world = run.cfg, run.rank, run.world
    # rank 0 verifies the newest committed checkpoint (sha256 of every file) and converts it when
    # needed; the others wait for its verdict instead of hashing the same files again
    verdict: list = [None, None, None]
    if rank == 0:
        try:
            plan = resume.plan_resume(cfg, world, run.manifest_sha, verify=True, manifest=run.manifest)
            if plan.universal:
                resume.convert_to_universal(plan.checkpoint, RunDir(cfg.run_dir), log=run.say)
            verdict = [None, plan.checkpoint.tag if plan.checkpoint else None, None]
        except (ckpt.CheckpointError, ConfigError) as exc:
            verdict = [str(exc), None, type(exc) is ConfigError]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise (ConfigError if verdict[2] else ckpt.CheckpointError)(verdict[0])
    if rank != 0:
        plan = resume.plan_resume(cfg, world, run.manifest_sha, verify=False, manifest=run.manifest)
        if (plan.checkpoint.tag if plan.checkpoint else None) != verdict[1]:
            raise ckpt.CheckpointError(f"rank {rank} sees another newest checkpoint than rank 0 "
                                       f"({verdict[1]}): is {cfg.run_dir} on storage all nodes share?")
    run.phases.mark("check checkpoints")
    run.start_tracker(plan.saved.wandb_run_id if plan.saved else None)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = initial_model(resolve_model_config(cfg.model, run.manifest.tokenizer.vocab_size))
    run.phases.mark("build model")
    engine = initialize(model, cfg, world, load_universal=plan.universal)
    run.phases.mark("DeepSpeed init")
    state = st.TrainState(data_manifest_sha256=run.manifest_sha)
    if plan.checkpoint is not None:
        resume.load(engine, plan, cfg, state, rank, world)
        run.phases.mark("resume")
    for span in run.pending_skips:
        if span not in state.skipped_batches:
            state.skipped_batches.append(span)
    run.train_data.eras = resume.settle_eras(state, run.train_data, run.manifest_sha, cfg.train.seed, log=run.say)
    return engine, state, plan.checkpoint, plan.saved


def _log_window(run: Run, engine, state: st.TrainState, meter: metrics.Meter, lr: float, grad_norm,
                skips: guards.SkipCounter, end_step: int, flops_per_token: float, peak) -> None:
    cfg = run.cfg
    mem = torch.tensor([metrics.peak_memory_gib()], dtype=torch.float64, device=engine.device)
    import torch.distributed as dist

    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    m = metrics.throughput(steps=meter.steps, seconds=meter.seconds, data_seconds=meter.data_seconds,
                           global_batch=cfg.train.global_batch_size, seq_len=cfg.train.seq_len,
                           world_size=run.world, flops_per_token=flops_per_token, peak=peak)
    m |= {"train/lr": lr, "train/consumed_samples": state.consumed_samples,
          "train/skipped_steps": skips.total, "train/peak_memory_gib": float(mem.item())}
    if meter.losses:
        m["train/loss"] = float(np.mean(meter.losses))
    if grad_norm is not None and math.isfinite(grad_norm):
        m["train/grad_norm"] = float(grad_norm)
    scale = loss_scale(engine)
    if scale is not None:
        m["train/loss_scale"] = scale
    run.tracker.log(m, step=state.step)
    run.say(metrics.console_line(state.step, cfg.train.max_steps, m, meter.eta_s(end_step - state.step)))


def _validate_and_save(run: Run, engine, state: st.TrainState, *, validate: bool, schedule: Schedule,
                       stopped_by: str | None = None) -> Path | None:
    msg = ""
    if validate:
        val = validation_loss(engine, run.val_data, run.cfg, run.rank, run.world)
        run.tracker.log({"val/loss": val, "val/perplexity": float(np.exp(val))}, step=state.step)
        msg = f"validation loss {val:.4f}; "
    notes = resume.SaveNotes(lr_schedule=schedule.record(), stopped_by=stopped_by,
                             rewound_to=run.cfg.checkpoint.resume_from, hold=run.hold)
    path = resume.save(engine, run.cfg, state, run.rank, run.world, notes)
    run.say(f"step {state.step}: {msg}checkpoint committed: {path}")
    return path


class _Attempt:
    """One engine build and the steps it trains; a rollback starts a new attempt."""

    def __init__(self, run: Run):
        cfg, t = run.cfg, run.cfg.train
        self.run, self.cfg, self.t = run, cfg, t
        self.engine, self.state, self.resumed, saved = _build(run)
        self.schedule, self.schedule_changed = resumed(saved.lr_schedule if saved else None, cfg.optim,
                                                       t.max_steps, self.state.step)
        self.state.wandb_run_id = run.tracker_ready().run_id  # started in _build, with this run's id
        run.phases.mark("tracking")
        self.accum = cfg.gradient_accumulation_steps(run.world)
        self.end_step = min(t.max_steps, t.stop_at_step or t.max_steps)
        self.detector = guards.SpikeDetector(t.spike_window_steps, t.spike_zscore, list(self.state.spike_history))
        self.skips = guards.SkipCounter(t.max_consecutive_skips, {"nonfinite": 0, "overflow": 0, "spike": 0}
                                        | self.state.skip_counts, self.state.consecutive_skips)
        self.flops_per_token = train_flops_per_token(self.engine.module.cfg, t.seq_len)
        self.peak = metrics.peak_tflops(t.peak_tflops_per_device, t.precision, metrics.device_name())
        self.hold_check = t.zero_stage == 0 and t.precision != "fp16"  # see guards.py
        self.meter, self.saves = metrics.Meter(), SavePolicy(cfg, self.end_step, run.rank)

    def announce(self) -> None:
        run, t, state = self.run, self.t, self.state
        data = run.train_data
        run.say(f"train: world size {run.world}, {param_count(self.engine.module.cfg) / 1e6:.2f}M parameters, "
                f"ZeRO-{t.zero_stage}{' + optimizer offload' if t.offload_optimizer else ''}"
                f"{' + parameter offload' if t.offload_params else ''}, {t.precision}, accumulation {self.accum}, "
                f"{self.flops_per_token / 1e6:.1f} MFLOP/token, train samples "
                + ", ".join(f"{n}: {len(s)} (weight {w:g})" for n, s, w in zip(data.names, data.sources, data.weights))
                + (f", resumed from {self.resumed.path} at step {state.step}" if self.resumed else ""))
        if run.rank == 0 and not run.pending_skips:  # this start's first attempt (a rollback is no restart)
            record_restart(run.tracker, run.say, count_start(self.cfg.run_dir), state.step,
                           str(self.resumed.path) if self.resumed else None, self.cfg.launch.max_restarts)
        if self.schedule_changed:
            run.say(describe_change(self.schedule, self.schedule_changed))
        newest = Era.from_json(state.data_eras[-1]) if len(state.data_eras) > 1 else None
        if newest is not None and newest.start == state.next_trainable():  # the dataset grew: mark it
            run.tracker.log({"data/era": len(state.data_eras) - 1, "data/train_samples": sum(newest.num_samples),
                             "data/era_start_sample": newest.start}, step=state.step + 1)
        if state.step == 0 and self.resumed is None and not run.pending_skips:
            val = validation_loss(self.engine, run.val_data, self.cfg, run.rank, run.world)
            run.tracker.log({"val/loss": val, "val/perplexity": float(np.exp(val)), "world_size": run.world}, step=0)
            run.say(f"step 0: validation loss {val:.4f}")
            run.phases.mark("step 0 validation")

    def train(self) -> Outcome:
        """Steps until the end (or stop_at_step), a preemption, or a rollback."""
        run, state = self.run, self.state
        self.announce()
        while state.step < self.end_step:
            result = self.step()
            if result.verdict.rollback is not None:
                _release(self.engine)
                return Outcome(state, rollback=result.verdict.rollback)
            self.account(result)
            run.phases.first_step_done(run.say)
            save = self.saves.due(state.step, result.verdict)
            if save is None:
                continue
            stopped_by = (run.preemption.signal_name or "SIGTERM") if save.stop else None
            if save.stop:
                run.say(f"step {state.step}: {run.preemption.signal_name or 'a peer rank was signalled'}: "
                        f"saving and stopping (preemption)")
            with run.phases.saving():
                _validate_and_save(run, self.engine, state, validate=save.validate, schedule=self.schedule,
                                   stopped_by=stopped_by)
            if save.stop:
                run.preemption.disarm()
                return Outcome(state, preempted=True)
            run.pending_skips.clear()
            self.saves.saved()
            self.meter.reset()
        return Outcome(state)

    def step(self) -> StepResult:
        """One optimizer step over this rank's share of the next global batch."""
        state, engine, t = self.state, self.engine, self.t
        state.next_trainable()
        self.meter.start_step()
        lr = self.schedule.lr(state.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        start, losses, skipped_before = state.consumed_samples, [], engine.skipped_steps
        grad_norm, held = None, False
        for m in range(self.accum):
            loss = self.forward(start, m)
            losses.append(loss.detach())
            last = m == self.accum - 1
            if last:
                v = self.judge(losses, start)
                if v.rollback is not None:
                    return StepResult(v, lr)
                if v.nonfinite or (v.spike and t.spike_action == "skip"):
                    loss = guards.poison(loss)  # DeepSpeed (or the ZeRO-0 hold) discards the update
            engine.backward(loss)
            if last and self.hold_check:
                grad_norm, held = guards.hold_nonfinite_step(engine)
            engine.step()
        if not self.hold_check:
            grad_norm = engine.get_global_grad_norm()
        state.step += 1
        state.consumed_samples = start + t.global_batch_size
        return StepResult(v, lr, grad_norm, held or engine.skipped_steps > skipped_before)

    def forward(self, start: int, micro: int) -> torch.Tensor:
        """The loss of this rank's micro-batch ``micro`` of the global batch at ``start`` (digested)."""
        run, state, engine, t = self.run, self.state, self.engine, self.t
        t0 = time.perf_counter()
        src, ids = run.train_data.ids(rank_positions(start, micro, run.rank, run.world, t.micro_batch_size_per_gpu))
        state.sample_digest = st.digest_update(state.sample_digest, src, ids)
        batch = run.train_data.batch(src, ids)
        self.meter.add_data_time(time.perf_counter() - t0)
        batch = batch.to(engine.device)
        loss = engine(*batch, doc_ids=batch.doc_ids)  # (input_ids, labels); doc_ids: data.document_masking
        return run.faults.apply(loss, state.step + 1, start, start + t.global_batch_size)

    def judge(self, losses: list[torch.Tensor], start: int) -> Verdict:
        """Before the last backward: what all ranks agree on, and whether the loss spiked."""
        t, run = self.t, self.run
        v = Verdict(*_agree(self.engine, losses, run.preemption.requested, self.saves.clock_due()))
        if v.nonfinite or t.spike_action == "off" or not self.detector.is_spike(v.loss):
            return v
        v.spike, v.zscore = True, guards.spike_zscore(self.detector.history, v.loss)
        step = self.state.step + 1
        run.tracker.log({"train/spike_loss": v.loss, "train/spike_zscore": v.zscore}, step=step)
        run.say(f"step {step}: loss spike {v.loss:.4f} ({v.zscore:.1f} σ over the last "
                f"{len(self.detector.history)} steps); action: {t.spike_action}")
        if t.spike_action == "rollback":
            v.rollback = [start, start + t.spike_skip_batches * t.global_batch_size]
        return v

    def account(self, result: StepResult) -> None:
        """Count the step as applied or skipped (maybe halting), feed the spike window, log."""
        state, t, v = self.state, self.t, result.verdict
        if result.skipped:
            reason = "spike" if v.spike else "nonfinite" if v.nonfinite or t.precision != "fp16" else "overflow"
            self.run.say(f"step {state.step}: update skipped ({reason}); weights and optimizer state unchanged")
            self.skips.skipped(reason, state.step)
            self.meter.end_step(None)
        else:
            self.skips.applied()
            self.detector.record(v.loss)
            self.meter.end_step(v.loss)
        state.spike_history, state.skip_counts = self.detector.history, self.skips.counts
        state.consecutive_skips = self.skips.consecutive
        if self.run.line is not None:
            eta = self.meter.eta_s(self.end_step - state.step)
            self.run.line.show(f"step {state.step}/{t.max_steps} ({100 * state.step / t.max_steps:.0f}%) | "
                               f"ETA {format_duration(eta, 'compact')}")
        if state.step % t.log_interval_steps == 0 or state.step == self.end_step:
            _log_window(self.run, self.engine, state, self.meter, result.lr, result.grad_norm, self.skips,
                        self.end_step, self.flops_per_token, self.peak)
            self.meter.reset()


def _release(engine) -> None:
    """Free an engine before a rollback builds the next one (hooks, buffers, ZeRO partitions)."""
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        destroy()


def _close_tracker(run: Run) -> None:
    """Close the tracker, also one still starting when the build failed (that failure is the one
    reported; a W&B error of the same start is then a second, lesser one)."""
    if run.tracker is None and run.tracker_start is not None:
        try:
            run.tracker_ready()
        except Exception:  # noqa: BLE001 - the build's own error is already on its way up
            return
    if run.tracker is not None:
        run.tracker.close()


def train(cfg: PipelineConfig, log=print, hold=None) -> dict:
    """Run training on this rank; returns the final summary (rank 0's view). ``hold``: asked at each
    commit, how many unevaluated checkpoints retention keeps for a live eval job (None: none runs)."""
    import torch.distributed as dist

    phases = console.Phases()
    third_party = console.ThirdParty(cfg.run_dir, int(os.environ.get("RANK", "0"))).install()  # console.py
    init_distributed(cfg)
    phases.mark("process group")
    rank, world = dist.get_rank(), dist.get_world_size()
    data_dir = DatasetDir(cfg.data.output_dir).root
    manifest = verify_manifest(data_dir)
    seed, seq_len, arch = cfg.train.seed, cfg.train.seq_len, cfg.model.arch
    cfg.gradient_accumulation_steps(world)  # a ConfigError naming the fields, before anything is built
    weights = {s.resolved_name: s.weight for s in cfg.data.sources}
    masking = cfg.data.document_masking
    split = lambda name: BlendedSamples(open_split(data_dir, manifest, name, seq_len, arch=arch, seed=seed,
                                                   document_masking=masking), weights, seed)
    line = ProgressLine(log) if rank == 0 and log is print and sys.stdout.isatty() else None
    run = Run(cfg, rank, world, line.say if line else log if rank == 0 else (lambda *a, **k: None), manifest, manifest_sha256(data_dir),
              split("train"), split("validation"), Preemption(cfg.checkpoint.preempt_grace_s),
              guards.Faults.from_env(rank), hold=hold, phases=phases, line=line)
    phases.mark("verify data")
    run.preemption.install()
    mark_ready(rank)
    try:
        while True:
            outcome = _Attempt(run).train()
            if outcome.rollback is None:
                break
            run.pending_skips.append(outcome.rollback)
            run.say(f"rollback: rebuilding from the newest committed checkpoint; samples "
                    f"[{outcome.rollback[0]}, {outcome.rollback[1]}) will never be trained on")
            gc.collect()
    finally:
        run.preemption.uninstall()
        third_party.uninstall()
        _close_tracker(run)
    dist.barrier()
    s = outcome.state
    if not outcome.preempted:
        newest = ckpt.latest_committed(RunDir(cfg.run_dir).checkpoints, verify=False)
        run.say(console.summary(cfg.run_dir, phases, s.step, s.consumed_samples * seq_len,
                                str(newest.path) if newest else None))
    return {"step": s.step, "consumed_samples": s.consumed_samples, "wandb_run_id": s.wandb_run_id,
            "wandb_dir": run.tracker.run_dir if run.tracker else None, "preempted": outcome.preempted,
            "stopped_by": run.preemption.signal_name if outcome.preempted else None,
            "skipped_steps": sum(s.skip_counts.values())}
