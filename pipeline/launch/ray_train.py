"""The train stage of a Ray job: Ray Train's TorchTrainer runs one `train()` per rank, on any nodes.

``python -m pipeline.launch.ray_train CONFIG`` is what `pretrain submit --to ray` puts in the job's
entrypoint, and `pretrain train --backend ray` calls `fit` the same way. It is the multi-node path on
Ray: Ray places ``launch.nodes × ranks per node`` workers (one GPU each, or one CPU each on CPU
nodes), sets RANK/WORLD_SIZE/MASTER_ADDR and the process group, and each worker calls the same
`pipeline.train.loop.train` that torchrun and srun ranks call. This process (the job's driver) is
the parent of the ranks: it runs the shared preamble (`pipeline.launch.preamble`) around the whole
fit, like the parent of `pretrain train` does around torchrun.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.errors import PipelineError
from pipeline.launch import lock
from pipeline.launch.env import cpu_or_cuda
from pipeline.launch.preamble import guarded, lease, stage_inputs
from pipeline.objstore import is_uri
from pipeline.rundir import RunDir
from pipeline.train.restarts import LAUNCH_ENV

WHO = "ray train"
# Set in the driver; Ray Train passes them on to its controller and workers.
RAY_TRAIN_ENV = {
    # Ray Train's print patch sends each print of a worker both to its stdout and to a logger that
    # writes to the console too: every line twice in the job log. Our ranks print plain lines.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Train's node-drain watcher: nothing here reads its notices (a rank stops on SIGTERM), and its
    # actor logs a core_worker error line at every start.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def _worker(config: dict) -> None:
    """One rank, inside a Ray Train worker; the process group is already set up by Ray Train."""
    from pipeline.config import build_config
    from pipeline.train.loop import train

    os.environ.setdefault("DS_ACCELERATOR", cpu_or_cuda())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCH_ENV] = config["launch_id"]  # every restart of this fit counts under one name
    cfg = build_config(config["pipeline"], origin="(ray job)")
    stage_inputs(cfg)  # a run or dataset on an object store: this worker's node mirrors it first
    train(cfg)


def for_ray_workers(cfg: PipelineConfig, num_workers: int | None) -> PipelineConfig:
    """The config Ray Train workers get: absolute paths (a worker's working directory is Ray's), and
    ``num_workers`` ranks in total as launch.nodes × ranks per node (one GPU each, or one CPU each)."""
    launch, train = cfg.launch, cfg.train
    if num_workers is not None:
        if num_workers < 1:
            raise ConfigError(f"--num-workers must be positive, got {num_workers}")
        per_node = launch.gpus_per_node or 1
        if num_workers % per_node:
            raise ConfigError(f"--num-workers {num_workers} is not a multiple of launch.gpus_per_node ({per_node})")
        launch = launch.model_copy(update={"nodes": num_workers // per_node})
        train = train.model_copy(update={"nproc_per_node": 1})
    data = cfg.data.model_copy(update={"output_dir": _absolute(cfg.data.output_dir)})
    return cfg.model_copy(update={"run_dir": _absolute(cfg.run_dir), "data": data, "launch": launch, "train": train})


def _absolute(location: str) -> str:
    """A local path made absolute; an object-store URI as it is."""
    return location if is_uri(location) else str(Path(location).resolve())


def _storage(cfg: PipelineConfig) -> dict:
    """RunConfig's storage: the object store itself when the run lives there (every worker node
    reaches it; no shared filesystem needed), else the run directory's ray_train folder."""
    run = RunDir(cfg.run_dir)
    if not run.remote:
        return {"storage_path": str(RunDir(Path(cfg.run_dir).resolve()).ray_train)}
    import pyarrow.fs

    from pipeline.objstore import filesystem, split_uri

    scheme, bucket, prefix = split_uri(run.remote)
    handler = pyarrow.fs.FSSpecHandler(filesystem(scheme))
    return {"storage_path": "/".join(p for p in (bucket, prefix, "ray_train") if p),
            "storage_filesystem": pyarrow.fs.PyFileSystem(handler)}


def _trainer(cfg: PipelineConfig, world: int):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.engine import pick_backend

    use_gpu = cfg.launch.gpus_per_node > 0
    return TorchTrainer(
        _worker,
        train_loop_config={"pipeline": cfg.model_dump(mode="json"), "launch_id": f"ray-{uuid.uuid4().hex[:12]}"},
        torch_config=TorchConfig(backend="nccl" if use_gpu else pick_backend(cfg),
                                 timeout_s=cfg.train.dist_timeout_s),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name=cfg.name, **_storage(cfg),
                             # a failed worker restarts the whole group, which resumes from the last COMMIT
                             failure_config=FailureConfig(max_failures=cfg.launch.max_restarts)),
    )


def fit(cfg: PipelineConfig, log=print) -> int:
    """Run the ranks on Ray Train under the preamble (budget, run lock, inputs verified here)."""
    ranks = cfg.launch.ranks_per_node(cfg.train)
    world = cfg.launch.nodes * ranks
    cfg.gradient_accumulation_steps(world)  # fail before any worker starts

    def work(_held) -> int:
        for key, value in RAY_TRAIN_ENV.items():
            os.environ.setdefault(key, value)
        trainer = _trainer(cfg, world)
        kind = " GPU" if cfg.launch.gpus_per_node > 0 else " CPU"
        log(f"{WHO}: {world} workers ({cfg.launch.nodes} node(s) × {ranks}{kind} ranks)")
        result = trainer.fit()
        if result.error is not None:
            log(f"{WHO}: failed: {result.error}")
            return 1
        return 0

    def hold():
        run_dir, lease_s, heartbeat_s, enabled = lease(cfg)
        return lock.run_lock(_absolute(run_dir), lease_s, heartbeat_s, enabled, command="pretrain ray train (driver)")

    return guarded(cfg, work, who=WHO, hold=hold, verify=True, say=log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.launch.ray_train",
                                description="Train stage of a Ray job (Ray Train TorchTrainer).")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    try:
        return fit(load_config(args.config, args.overrides))
    except PipelineError as exc:
        print(f"{WHO}: {'error: ' if exc.prefix_error else ''}{exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
