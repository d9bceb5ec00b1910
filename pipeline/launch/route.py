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
verified by the parent before any rank starts, a halt → one line and its exit code).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config import PipelineConfig
from pipeline.errors import EXIT_USER_ERROR
from pipeline.launch import local, lock, ray_train
from pipeline.launch.env import global_rank, under_launcher
from pipeline.launch.preamble import guarded, lease, tidy_finished

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
            train(cfg)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0

    say = print if global_rank() == "0" else _silent
    return guarded(cfg, work, who=WHO, hold=lambda: lock.rank_lock(*lease(cfg)), verify=False, say=say)


def run_budget_spent(cfg: PipelineConfig, why: str) -> int:
    """Nothing to train; finish what a crash right after the last commit may have left undone."""
    cfg.gradient_accumulation_steps(cfg.train.nproc_per_node)  # a bad config still fails here
    print(f"{WHO}: {why}")
    tidy_finished(cfg)
    return 0


def run_own_torchrun(cfg: PipelineConfig) -> int:
    """train.nproc_per_node ranks under a torchrun we start; they learn that we hold the lock."""

    def work(held) -> int:
        os.environ[lock.HELD_ENV] = held.token  # our ranks must not take it again
        try:
            return local.run_torchrun(cfg)
        finally:
            os.environ.pop(lock.HELD_ENV, None)

    return _as_parent(cfg, work)


def run_single_process(cfg: PipelineConfig) -> int:
    """One rank, in this process."""

    def work(_held) -> int:
        local.run_single_process(cfg)
        return 0

    return _as_parent(cfg, work)


def _as_parent(cfg: PipelineConfig, work) -> int:
    cfg.gradient_accumulation_steps(cfg.train.nproc_per_node)  # fail before any process starts
    return guarded(cfg, work, who=WHO, hold=lambda: lock.run_lock(*lease(cfg)), verify=True)


def _silent(_line: str) -> None:
    """Ranks other than 0 keep quiet about the budget: one line per run, not one per rank."""
