"""The train stage of a Ray job: Ray Train's TorchTrainer runs one `train()` per rank, on any nodes.

``python -m pipeline.launch.ray_train CONFIG`` is what `pretrain submit --to ray` puts in the job's
entrypoint. It is the multi-node path on Ray: Ray places ``launch.nodes × ranks per node`` workers
(one GPU each, or one CPU each on CPU nodes), sets RANK/WORLD_SIZE/MASTER_ADDR and the process group,
and each worker calls the same `pipeline.train.loop.train` that torchrun and srun ranks call.
This process (the job's driver) holds the run-directory lock around the whole fit, like the parent
of `pretrain train` does around torchrun.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, load_config


def _worker(config: dict) -> None:
    """One rank, inside a Ray Train worker; the process group is already set up by Ray Train."""
    from pipeline.config import build_config
    from pipeline.launch.local import cpu_or_cuda
    from pipeline.train.loop import train

    os.environ.setdefault("DS_ACCELERATOR", cpu_or_cuda())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    train(build_config(config["pipeline"], origin="(ray job)"))


def fit(cfg: PipelineConfig, log=print) -> int:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.launch import lock
    from pipeline.train.engine import pick_backend

    world = cfg.launch.nodes * cfg.launch.ranks_per_node(cfg.train)
    cfg.gradient_accumulation_steps(world)  # fail before any worker starts
    spent = lock.budget_spent(cfg)
    if spent:
        log(f"ray train: {spent}")
        return 0
    use_gpu = cfg.launch.gpus_per_node > 0
    run_dir = Path(cfg.run_dir).resolve()
    with lock.run_lock(run_dir, cfg.launch.lock_lease_s, cfg.launch.lock_heartbeat_s,
                       command="pretrain ray train (driver)"):
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"pipeline": cfg.model_dump(mode="json")},
            torch_config=TorchConfig(backend="nccl" if use_gpu else pick_backend(cfg),
                                     timeout_s=cfg.train.dist_timeout_s),
            scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                         resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1}),
            run_config=RunConfig(name=cfg.name, storage_path=str(run_dir / "ray_train")),
        )
        log(f"ray train: {world} workers ({cfg.launch.nodes} node(s) × {cfg.launch.ranks_per_node(cfg.train)}"
            f"{' GPU' if use_gpu else ' CPU'} ranks)")
        result = trainer.fit()
    if result.error is not None:
        log(f"ray train: failed: {result.error}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.launch.ray_train",
                                description="Train stage of a Ray job (Ray Train TorchTrainer).")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    from pipeline.launch.lock import RunLocked

    try:
        return fit(load_config(args.config, args.overrides))
    except ConfigError as exc:
        print(f"ray train: {exc}", file=sys.stderr)
        return 2
    except RunLocked as exc:
        print(f"ray train: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
