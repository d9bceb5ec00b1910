"""Our config → DeepSpeed config → ``deepspeed.initialize``. The only place DeepSpeed is set up.

Optimizer: torch AdamW (fused on CUDA) handed to DeepSpeed as a client optimizer, with weight decay
on matrices only. With ``train.offload_optimizer`` the optimizer comes from DeepSpeed's config block
instead (DeepSpeed refuses a client optimizer under ZeRO-Offload): DeepSpeedCPUAdam where CUDA is
present, torch AdamW (``torch_adam: true``) on CPU-only machines, where no C++ op has to build.

The LR is not a DeepSpeed scheduler: the loop sets it before every update from the pure schedule
(`set_lr`), so nothing about it has to survive a checkpoint.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from torch import nn

from pipeline.config import ConfigError, ModelConfig, PipelineConfig
from pipeline.train.compat import resolve_model_config  # noqa: F401 - re-exported for the loop
from pipeline.train.schedule import lr_multiplier

# DeepSpeed's converter asserts on checkpoints saved without this client state (ENVIRONMENT.md).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def pick_backend(cfg: PipelineConfig) -> str:
    if cfg.train.backend != "auto":
        return cfg.train.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: PipelineConfig) -> None:
    """Join the process group the launcher described (torchrun, deepspeed, accelerate, srun, Ray Train)."""
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # plain `srun`, no torchrun
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
    if torch.cuda.is_available():  # one GPU per rank, before any collective (NCCL needs it)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        # DeepSpeed's CPU backend JIT-loads a shared-memory all-reduce op (used by inference only)
        # under torch's build lock in ~/.cache/torch_extensions. A rank killed while holding that
        # lock leaves it behind, and every later start on the machine then waits forever (seen in
        # this project's tests). Training all-reduces go through torch.distributed anyway.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend=pick_backend(cfg),
        timeout=timedelta(seconds=cfg.train.dist_timeout_s),
        verbose=False,
    )


def deepspeed_config(cfg: PipelineConfig, world_size: int, *, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON, generated from our config tree (users never write it by hand)."""
    t, o = cfg.train, cfg.optim
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3 and t.precision == "bf16":
        # ZeRO-3 + autocast all-gathers Linear weights in bf16. Parameters under the persistence
        # threshold stay gathered between steps, and after a checkpoint load they do not hold the
        # same bits as in the run that continued (measured: the loss differs from the 6th digit
        # on). With none persistent, every forward gathers from the fp32 partitions, and a resumed
        # run continues bit for bit; the price is a few more small all-gathers per step.
        zero["stage3_param_persistence_threshold"] = 0
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size_per_gpu,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps(world_size),
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our client optimizer is torch's AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer:
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": not torch.cuda.is_available(),
        }}
    if t.precision == "bf16":
        # fp32 master weights, bf16 compute: measured 1.6× faster than DeepSpeed's bf16 optimizer
        # path on an H100 (../shared/GPU.md), and it runs on CPU too
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2,
                      "loss_scale_window": 1000, "min_loss_scale": 1}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices (embeddings, linear weights); none on biases and norm gains."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next ``step()`` can be called off (``skip_next_step = True``): the ZeRO-0
    path of the non-finite guard (guards.py), where DeepSpeed has no overflow check of its own."""

    skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: PipelineConfig) -> torch.optim.Optimizer:
    """AdamW over our parameter groups, fused on CUDA."""
    o = cfg.optim
    return SkippableAdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                             fused=torch.cuda.is_available())


def initialize(model: nn.Module, cfg: PipelineConfig, world_size: int, *, load_universal: bool = False):
    """The DeepSpeed engine for ``model``; compiled when ``train.compile``."""
    import deepspeed

    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 "
                          "kernels); use bf16 on CPU")
    ds_config = deepspeed_config(cfg, world_size, load_universal=load_universal)
    if cfg.train.offload_optimizer:  # DeepSpeed builds the optimizer from ds_config["optimizer"]
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config)
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds_config)
    if cfg.train.compile:
        engine.compile()
    return engine


def set_lr(engine, cfg: PipelineConfig, step: int) -> float:
    """Put the schedule's LR for update number ``step`` on every parameter group; returns it."""
    lr = cfg.optim.lr * lr_multiplier(step, cfg.optim, cfg.train.max_steps)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    return lr


def loss_scale(engine) -> float | None:
    """The dynamic fp16 loss scale, None when there is none (fp32, bf16)."""
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "loss_scale", None)
    if scale is None:
        scale = getattr(engine.optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None
