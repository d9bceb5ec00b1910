"""How `pretrain train` runs: one decision (`choose_route`), then one function per way of running.

    route           when (first match wins)                     who holds the run lock
    ray-driver      --backend ray, and no launcher started us   this process, the Ray Train driver
    launcher        RANK or SLURM_PROCID is set (torchrun,      global rank 0, unless our own
                    deepspeed, accelerate, srun, Ray Train)     `pretrain train` parent already does
    budget-spent    the newest committed checkpoint is at       briefly, to tidy the checkpoints
                    train.max_steps (a late scheduled firing)
    torchrun        train.nproc_per_node > 1                    this process, around our torchrun
    single-process  otherwise                                   this process

Every route but budget-spent runs its work inside `preamble.guarded` (budget, run lock, inputs
verified by the parent before any rank starts, a halt → one line and its exit code). Before that,
`run_train` refuses paths that cannot work, sets aside what ``checkpoint.resume_from`` rewinds past
and, in a process that no launcher started, turns a signal into one line: SIGINT/SIGTERM before the
ranks are training stops at once (`Interrupted`: exit 130/143), SIGINT while they train commits at
the next step boundary and exits 130 (SIGTERM: exit 0, the preemption contract), and a second
Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config import PipelineConfig
from pipeline.errors import EXIT_USER_ERROR, Halted, Interrupted, PipelineError
from pipeline.launch import local, lock, ray_train
from pipeline.launch.env import global_rank, under_launcher
from pipeline.launch.preamble import (check_before_start, check_paths, drop_own_lease, eval_hold, guarded,
                                      lease, push_outputs, rewind, stage_inputs, tidy_finished)
from pipeline.train.preemption import REPORTS_ENV, report_error

WHO = "pretrain train"
RAY_DRIVER = "ray-driver"
LAUNCHER = "launcher"
BUDGET_SPENT = "budget-spent"
TORCHRUN = "torchrun"
SINGLE_PROCESS = "single-process"


@dataclass(frozen=True)
class Route:
    """How this `pretrain train` runs, and why (one line, for messages and tests)."""

    name: str
    why: str


def choose_route(backend: str, nproc_per_node: int, env: Mapping[str, str], spent: str | None = None) -> Route:
    """The way to run `train`, from facts only: ``backend`` (--backend), ``nproc_per_node``
    (train.nproc_per_node), the process environment, and ``spent`` (`lock.budget_spent`'s answer)."""
    if under_launcher(env):  # before --backend ray: a Ray Train worker is one rank too
        return Route(LAUNCHER, "a launcher started this process (RANK/SLURM_PROCID): it is one rank")
    if backend == "ray":
        return Route(RAY_DRIVER, "--backend ray: Ray Train starts the ranks, this process is the driver")
    if spent:
        return Route(BUDGET_SPENT, spent)
    if nproc_per_node > 1:
        return Route(TORCHRUN, f"train.nproc_per_node is {nproc_per_node}: we start torchrun")
    return Route(SINGLE_PROCESS, "one rank and no launcher: train in this process")


def run_train(cfg: PipelineConfig, backend: str = "local", num_workers: int | None = None) -> int:
    """`pretrain train`: choose the route and run it; the exit code of the command."""
    check_paths(cfg)
    stage_inputs(cfg)
    try:
        return _run_train(cfg, backend, num_workers)
    finally:
        if global_rank() == "0":
            push_outputs(cfg)


def _run_train(cfg: PipelineConfig, backend: str, num_workers: int | None) -> int:
    if under_launcher(os.environ):  # one rank: its launcher (or our parent) sees to signals and rewinds
        return _dispatch(cfg, backend, num_workers)
    with _StopOnSignals(cfg):
        try:
            if cfg.checkpoint.resume_from is not None:
                rewind(cfg)
            return _dispatch(cfg, backend, num_workers)
        except KeyboardInterrupt:  # the second Ctrl-C, raised where training was
            drop_own_lease(cfg.run_dir)
            raise Interrupted(signal.SIGINT, f"second SIGINT: aborted at once; {local.resumes_from(cfg)}") from None
        except Interrupted:
            drop_own_lease(cfg.run_dir)
            raise


class _StopOnSignals:
    """Until the ranks install their own handlers (and after), SIGINT/SIGTERM/SIGUSR1 end the command
    with one line (`Interrupted`) instead of a traceback or a silent death; inside ``deferred()`` the
    signal waits for the block to finish."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    active: _StopOnSignals | None = None

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.waiting, self.pending = cfg, False, None
        self.previous: dict = {}

    def _stop(self, signum: int):
        return Interrupted(signum, f"{signal.Signals(signum).name} before the ranks were training: stopped; "
                                   f"{local.resumes_from(self.cfg)}")

    def _handle(self, signum, _frame) -> None:
        if self.waiting:
            self.pending = self.pending or signum
            return
        raise self._stop(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False
        if self.pending is not None:
            raise self._stop(self.pending)

    def __enter__(self) -> _StopOnSignals:
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        _StopOnSignals.active = self
        return self

    def __exit__(self, *exc) -> None:
        _StopOnSignals.active = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _load(*modules: str) -> None:
    """Import the heavy modules the ranks' parent needs (torch, DeepSpeed) with signals deferred:
    an import cut short by an exception leaves modules half-made."""
    stop = _StopOnSignals.active
    with stop.deferred() if stop else contextlib.nullcontext():
        for name in modules:
            importlib.import_module(name)


def _dispatch(cfg: PipelineConfig, backend: str, num_workers: int | None) -> int:
    route = choose_route(backend, cfg.train.nproc_per_node, os.environ, spent=lock.budget_spent(cfg))
    if route.name == RAY_DRIVER:
        return run_ray_driver(cfg, num_workers)
    if route.name == LAUNCHER:
        return run_under_launcher(cfg)
    if route.name == BUDGET_SPENT:
        return run_budget_spent(cfg, route.why)
    if route.name == TORCHRUN:
        return run_own_torchrun(cfg)
    return run_single_process(cfg)


def run_ray_driver(cfg: PipelineConfig, num_workers: int | None) -> int:
    """Ray Train's TorchTrainer runs the ranks (embedded Ray, or the cluster at RAY_ADDRESS)."""
    return ray_train.fit(ray_train.for_ray_workers(cfg, num_workers))


def run_under_launcher(cfg: PipelineConfig) -> int:
    """This process is one rank of a launcher's group. Its own resume check verifies the inputs (every
    rank re-hashing everything here would multiply the reads by the world size)."""
    # started by our own torchrun: die with it, never run on orphaned
    if os.environ.get(lock.HELD_ENV) and not local.die_with_parent("torch.distributed.run"):
        return EXIT_USER_ERROR

    def work(_held) -> int:
        import torch.distributed as dist

        from pipeline.train.loop import train

        try:
            train(cfg, hold=eval_hold(cfg))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0

    say = print if global_rank() == "0" else _silent
    reporting = bool(os.environ.get(REPORTS_ENV))
    try:
        return guarded(cfg, work, who=WHO, hold=lambda: lock.rank_lock(*lease(cfg)), verify=False, say=say,
                       halt_raises=reporting)
    except PipelineError as exc:
        line = f"stopped: {exc}" if isinstance(exc, Halted) else str(exc)
        if not report_error(int(global_rank()), line, exc.exit_code, exc.prefix_error):
            raise
        return _wait_to_be_stopped(exc.exit_code)


def _wait_to_be_stopped(code: int, patience_s: float = 30.0) -> int:
    """Our parent read the report and stops the ranks; exit by ourselves only if it does not."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
    return code


def run_budget_spent(cfg: PipelineConfig, why: str) -> int:
    """Nothing to train; finish what a crash right after the last commit may have left undone."""
    cfg.gradient_accumulation_steps(cfg.train.nproc_per_node)  # a bad config still fails here
    print(f"{WHO}: {why}")
    tidy_finished(cfg)
    return 0


def run_own_torchrun(cfg: PipelineConfig) -> int:
    """train.nproc_per_node ranks under a torchrun we start; they learn that we hold the lock and
    report to us (local._Supervisor)."""

    def work(held) -> int:  # no torch here: the ranks import it (local.run_torchrun asks the CUDA driver)
        os.environ[lock.HELD_ENV] = held.token if held is not None else "off"  # our ranks must not take it
        try:
            return local.run_torchrun(cfg)
        finally:
            os.environ.pop(lock.HELD_ENV, None)

    return _as_parent(cfg, work)


def run_single_process(cfg: PipelineConfig) -> int:
    """One rank, in this process."""

    def work(_held) -> int:
        _load("torch", "pipeline.train.loop")
        summary = local.run_single_process(cfg, hold=eval_hold(cfg))
        if summary.get("stopped_by") == "SIGINT":
            raise Interrupted(signal.SIGINT, f"SIGINT: saved and stopped; {local.resumes_from(cfg)}")
        return 0

    return _as_parent(cfg, work)


def _as_parent(cfg: PipelineConfig, work) -> int:
    check_before_start(cfg)  # the batch split, paths and the device: fail before any process starts
    return guarded(cfg, work, who=WHO, hold=lambda: lock.run_lock(*lease(cfg)), verify=True)


def _silent(_line: str) -> None:
    """Ranks other than 0 keep quiet about the budget: one line per run, not one per rank."""
