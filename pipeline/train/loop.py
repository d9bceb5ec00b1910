"""`pretrain train` on every rank: verify data → build → resume → step → log → checkpoint."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import pipeline
from pipeline.config import PipelineConfig, to_yaml
from pipeline.data.loader import GPTSamples, rank_positions, sample_ids
from pipeline.data.manifest import manifest_sha256, verify_manifest
from pipeline.models import build_model, load_state_dict_tied, state_dict_for_save
from pipeline.tracking import NullTracker, Tracker
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import init_distributed, initialize, resolve_model_config


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    wandb_run_id: str | None = None
    data_manifest_sha256: str = ""
    sample_digest: str = field(default_factory=lambda: hashlib.sha256().hexdigest())  # this rank's


def _digest_update(digest: str, ids: np.ndarray) -> str:
    """Chain this rank's sample digest: sha256(previous digest ‖ sample ids)."""
    return hashlib.sha256(digest.encode() + np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _all_mean(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.detach().float().cpu().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def validation_loss(engine, data: GPTSamples, cfg: PipelineConfig, rank: int, world: int) -> float:
    """Mean loss over the first ``eval.max_samples`` validation samples, split across ranks."""
    micro = cfg.eval.micro_batch_size
    n = min(len(data), cfg.eval.max_samples or len(data))
    per_round = micro * world
    rounds = max(1, n // per_round)  # every rank runs the same number of forwards (ZeRO-3 gathers)
    total = torch.zeros(())
    engine.eval()
    with torch.no_grad():
        for r in range(rounds):
            ids = [(r * per_round + rank * micro + i) % len(data) for i in range(micro)]
            x, y = data.batch(ids)
            total += engine(x.to(engine.device), y.to(engine.device)).float().cpu()
    engine.train()
    return _all_mean(total / rounds)


def _weights(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (gathered from all ranks under ZeRO-3), None elsewhere."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    params = list(module.parameters()) if zero_stage == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        if dist.get_rank() != 0:
            return None
        return state_dict_for_save(module)


def save(engine, cfg: PipelineConfig, state: TrainState, rank: int, world: int) -> Path | None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    root = Path(cfg.run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{ckpt.tag_for(state.step)}"
    if rank == 0 and tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng_rank{rank}.pt")
    digests = [None] * world
    dist.all_gather_object(digests, state.sample_digest)
    weights = _weights(engine, cfg.train.zero_stage)
    final = None
    if rank == 0:
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        info = asdict(state) | {
            "world_size": world, "sample_digests": digests, "code_version": pipeline.__version__,
            "model": engine.module.cfg.model_dump(mode="json"),
        }
        info.pop("sample_digest")
        (tmp / "trainer_state.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    dist.barrier()  # every rank's files are on disk before the commit
    if rank == 0:
        final = ckpt.commit(root, tmp, state.step, cfg.checkpoint.keep_last)
    dist.barrier()
    return final


def _resume(engine, cfg: PipelineConfig, state: TrainState, rank: int) -> ckpt.Committed | None:
    latest = ckpt.latest_committed(Path(cfg.run_dir) / "checkpoints", verify=True)
    if latest is None:
        return None
    saved = latest.trainer_state()
    if saved["data_manifest_sha256"] != state.data_manifest_sha256:
        raise ckpt.CheckpointError(
            f"{latest.path}: was trained on a different dataset (manifest sha256 "
            f"{saved['data_manifest_sha256'][:12]}… vs {state.data_manifest_sha256[:12]}…); "
            f"use a new run_dir or the original data.output_dir"
        )
    engine.load_checkpoint(str(latest.path.parent), tag=latest.tag, load_module_strict=True)
    rng_file = latest.path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    state.step, state.consumed_samples = saved["step"], saved["consumed_samples"]
    state.wandb_run_id = saved.get("wandb_run_id")
    digests = saved.get("sample_digests") or []
    if len(digests) > rank and saved.get("world_size") == len(digests):
        state.sample_digest = digests[rank]
    return latest


def train(cfg: PipelineConfig, log=print) -> dict:
    """Run training on this rank; returns the final summary (rank 0's view)."""
    import torch.distributed as dist

    init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    say = log if rank == 0 else (lambda *a, **k: None)
    data_dir = Path(cfg.data.output_dir)
    manifest = verify_manifest(data_dir)
    state = TrainState(data_manifest_sha256=manifest_sha256(data_dir))
    seq_len, micro, seed = cfg.train.seq_len, cfg.train.micro_batch_size_per_gpu, cfg.train.seed
    accum = cfg.gradient_accumulation_steps(world)
    train_data = GPTSamples(data_dir / "train", seq_len)
    val_data = GPTSamples(data_dir / "validation", seq_len)

    torch.manual_seed(seed)  # the same initial weights on every rank
    model = build_model(resolve_model_config(cfg.model, manifest["tokenizer"]["vocab_size"]))
    engine = initialize(model, cfg, world)
    resumed = _resume(engine, cfg, state, rank)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    tracker = (
        Tracker(cfg, Path(cfg.run_dir) / "metrics.jsonl", "train", run_id=state.wandb_run_id)
        if rank == 0 else NullTracker()
    )
    state.wandb_run_id = tracker.run_id
    n_params = sum(p.numel() for p in model.parameters())
    say(f"train: world size {world}, {n_params / 1e6:.2f}M parameters, ZeRO-{cfg.train.zero_stage}, "
        f"{cfg.train.precision}, accumulation {accum}, {len(train_data)} train samples"
        + (f", resumed from {resumed.path} at step {state.step}" if resumed else ""))
    try:
        if state.step == 0:
            val = validation_loss(engine, val_data, cfg, rank, world)
            tracker.log({"val/loss": val, "val/perplexity": float(np.exp(val)), "world_size": world}, step=0)
            say(f"step 0: validation loss {val:.4f}")
        window_t0, window_steps = time.perf_counter(), 0
        while state.step < cfg.train.max_steps:
            losses = []
            for m in range(accum):
                start, count = rank_positions(state.consumed_samples, m, rank, world, micro)
                ids = sample_ids(seed, len(train_data), start, count)
                state.sample_digest = _digest_update(state.sample_digest, ids)
                x, y = train_data.batch(ids)
                loss = engine(x.to(engine.device), y.to(engine.device))
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach())
            state.step += 1
            state.consumed_samples += cfg.train.global_batch_size
            window_steps += 1
            last = state.step == cfg.train.max_steps
            if state.step % cfg.train.log_interval_steps == 0 or last:
                loss_val = _all_mean(torch.stack(losses).mean())
                elapsed = time.perf_counter() - window_t0
                tokens_per_s = window_steps * cfg.train.global_batch_size * seq_len / elapsed
                grad_norm = engine.get_global_grad_norm()
                metrics = {
                    "train/loss": loss_val,
                    "train/lr": engine.get_lr()[0],
                    "train/tokens_per_s": tokens_per_s,
                    "train/samples_per_s": tokens_per_s / seq_len,
                    "train/consumed_samples": state.consumed_samples,
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                tracker.log(metrics, step=state.step)
                say(f"step {state.step}/{cfg.train.max_steps}: loss {loss_val:.4f}, "
                    f"lr {metrics['train/lr']:.2e}, {tokens_per_s:,.0f} tokens/s")
                window_t0, window_steps = time.perf_counter(), 0
            if state.step % cfg.checkpoint.save_interval_steps == 0 or last:
                val = validation_loss(engine, val_data, cfg, rank, world)
                tracker.log({"val/loss": val, "val/perplexity": float(np.exp(val))}, step=state.step)
                path = save(engine, cfg, state, rank, world)
                say(f"step {state.step}: validation loss {val:.4f}; checkpoint committed: {path}")
                window_t0, window_steps = time.perf_counter(), 0
    finally:
        tracker.close()
    dist.barrier()
    return {"step": state.step, "consumed_samples": state.consumed_samples, "wandb_run_id": state.wandb_run_id,
            "wandb_dir": tracker.run_dir}
