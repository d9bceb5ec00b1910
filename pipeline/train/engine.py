"""Our config → DeepSpeed config → ``deepspeed.initialize``. The only place DeepSpeed is set up."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from torch import nn

from pipeline.config import ConfigError, ModelConfig, PipelineConfig
from pipeline.train.schedule import lr_multiplier


def pick_backend(cfg: PipelineConfig) -> str:
    if cfg.train.backend != "auto":
        return cfg.train.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: PipelineConfig) -> None:
    """Join the process group the launcher described (torchrun, deepspeed, srun, Ray Train)."""
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # plain `srun`, no torchrun
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
    deepspeed.init_distributed(
        dist_backend=pick_backend(cfg),
        timeout=timedelta(seconds=cfg.train.dist_timeout_s),
        verbose=False,
    )


def resolve_model_config(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """Fill in the vocabulary from the tokenizer, padded to a multiple for fast matmuls."""
    if model.vocab_size is not None:
        if model.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab})"
            )
        return model
    m = model.pad_vocab_to_multiple_of
    return model.model_copy(update={"vocab_size": -(-tokenizer_vocab // m) * m})


def deepspeed_config(cfg: PipelineConfig, world_size: int) -> dict:
    """The DeepSpeed JSON, generated from our config tree (users never write it by hand)."""
    t = cfg.train
    ds: dict = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size_per_gpu,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # our optimizer is torch's AdamW (fused on GPU), passed in as a client optimizer
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # fp32 master weights, bf16 compute: measured 1.6× faster than DeepSpeed's bf16 optimizer
        # path on an H100 (../shared/GPU.md), and it runs on CPU too
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}
    return ds


def build_optimizer(model: nn.Module, cfg: PipelineConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with decay on matrices only (not biases, norms), and our LR schedule."""
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=o.betas, eps=o.eps, fused=torch.cuda.is_available(),
    )
    max_steps = cfg.train.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, o, max_steps))
    return optimizer, scheduler


def initialize(model: nn.Module, cfg: PipelineConfig, world_size: int):
    import deepspeed

    optimizer, scheduler = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine
