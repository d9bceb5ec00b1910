"""What a checkpoint carries besides the engine, and how a run saves and resumes it.

``trainer_state.json`` holds the loop's whole state as JSON: step, consumed samples, W&B run id,
data manifest hash, the ZeRO stage and world size it was written with, the per-rank sample digests,
the skip counters, the spike detector's window and the global sample ranges never trained on. With
the engine state (weights, optimizer moments) and per-rank RNG states, a resume continues bit for
bit on the same world size.

Sample digests prove which samples each rank read: ``sha256(previous ‖ source ids ‖ sample ids)``
chained over every micro-batch of a *segment* (steps trained on one world size). A resume on another
world size closes the segment into ``data_segments`` and starts a new chain, so a test can recompute
every segment from the pure sampling functions and check that the segments tile the sample stream.

Resuming on a different number of ranks (same global batch), or switching between ZeRO-1 and
ZeRO-2, goes through DeepSpeed universal checkpoints (ZeRO 1-3; a ZeRO-3 checkpoint stays ZeRO-3): rank 0 converts the committed checkpoint with
``deepspeed.checkpoint.ds_to_universal`` into ``checkpoints/.universal/step_N`` before the engine is
built, every rank loads it with ``checkpoint.load_universal``, then rank 0 deletes the copy. ZeRO-0
checkpoints hold the full model and optimizer in one file and load on any world size directly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import pipeline
from pipeline.config import PipelineConfig, to_yaml
from pipeline.data.eras import Era, EraError, EraStream, check_growth
from pipeline.data.manifest import same_or_grown
from pipeline.models import state_dict_for_save
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import UNIVERSAL_INFO

UNIVERSAL_DIR = ".universal"


def empty_digest() -> str:
    return hashlib.sha256().hexdigest()


def digest_update(digest: str, src: np.ndarray, ids: np.ndarray) -> str:
    """Chain a rank's sample digest: sha256(previous digest ‖ source ids ‖ sample ids)."""
    payload = np.asarray(src, dtype=np.int64).tobytes() + np.asarray(ids, dtype=np.int64).tobytes()
    return hashlib.sha256(digest.encode() + payload).hexdigest()


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    wandb_run_id: str | None = None
    data_manifest_sha256: str = ""
    sample_digest: str = field(default_factory=empty_digest)  # this rank's, for the current segment
    segment_start_step: int = 0
    data_segments: list[dict] = field(default_factory=list)  # closed: start/end step, world, digests
    skipped_batches: list[list[int]] = field(default_factory=list)  # [start, end) sample positions
    data_eras: list[dict] = field(default_factory=list)  # eras.Era records: the dataset grew mid-run
    skip_counts: dict[str, int] = field(default_factory=dict)
    consecutive_skips: int = 0
    spike_history: list[float] = field(default_factory=list)

    def next_trainable(self) -> int:
        """``consumed_samples`` moved past any skipped batch range that starts at it."""
        moved = True
        while moved:
            moved = False
            for start, end in self.skipped_batches:
                if start <= self.consumed_samples < end:
                    self.consumed_samples, moved = end, True
        return self.consumed_samples


def checkpoint_root(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "checkpoints"


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
    """Write and commit ``step_N`` (all ranks call this together); returns its path on rank 0."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    root = checkpoint_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{ckpt.tag_for(state.step)}"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state=UNIVERSAL_INFO, save_latest=False)
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng_rank{rank}.pt")
    digests = [None] * world
    dist.all_gather_object(digests, state.sample_digest)
    weights = _weights(engine, cfg.train.zero_stage)
    final = None
    if rank == 0:
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        info = asdict(state) | {
            "world_size": world, "sample_digests": digests, "zero_stage": cfg.train.zero_stage,
            "global_batch_size": cfg.train.global_batch_size, "code_version": pipeline.__version__,
            "model": engine.module.cfg.model_dump(mode="json"),
        }
        info.pop("sample_digest")
        (tmp / "trainer_state.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    dist.barrier()  # every rank's files are on disk before the commit
    if rank == 0:
        final = ckpt.commit(root, tmp, state.step, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every_steps)
    dist.barrier()
    return final


@dataclass(frozen=True)
class ResumePlan:
    """What the newest committed checkpoint needs from the engine before it is built."""

    checkpoint: ckpt.Committed | None
    saved: dict
    universal: bool  # load through a universal conversion (world size or ZeRO stage changed)


def plan_resume(cfg: PipelineConfig, world: int, manifest_sha: str, verify: bool = True,
                manifest: dict | None = None) -> ResumePlan:
    """Read the newest committed checkpoint (``verify``: against its COMMIT hashes) and check that it
    can continue this run: same dataset, or one grown from it by `prepare --append` (``manifest``)."""
    latest = ckpt.latest_committed(checkpoint_root(cfg), verify=verify)
    if latest is None:
        return ResumePlan(None, {}, False)
    saved = latest.trainer_state()
    trained_on = saved["data_manifest_sha256"]
    grown = same_or_grown(manifest or {}, manifest_sha, trained_on) and saved.get("data_eras")
    if trained_on != manifest_sha and not grown:
        raise ckpt.CheckpointError(
            f"{latest.path}: was trained on a different dataset (manifest sha256 "
            f"{trained_on[:12]}… vs {manifest_sha[:12]}…); use a new run_dir or the original "
            f"data.output_dir (a dataset grown with `pretrain prepare --append` continues the run)"
        )
    saved_batch = saved.get("global_batch_size", cfg.train.global_batch_size)
    if saved_batch != cfg.train.global_batch_size:
        raise ckpt.CheckpointError(
            f"{latest.path}: trained with train.global_batch_size {saved_batch}, this config says "
            f"{cfg.train.global_batch_size}; keep the global batch to resume (the sample order depends on it)"
        )
    stage, saved_stage = cfg.train.zero_stage, saved.get("zero_stage", cfg.train.zero_stage)
    saved_world = saved.get("world_size", world)
    if saved_stage != stage and {saved_stage, stage} != {1, 2}:
        raise ckpt.CheckpointError(
            f"{latest.path}: written with ZeRO-{saved_stage}, this run uses ZeRO-{stage}; only ZeRO-1 ↔ "
            f"ZeRO-2 can be switched on resume (DeepSpeed lays out ZeRO-0 and ZeRO-3 checkpoints "
            f"differently); keep train.zero_stage={saved_stage} for this run_dir"
        )
    universal = stage > 0 and (saved_world != world or saved_stage != stage)
    return ResumePlan(latest, saved, universal)


def convert_to_universal(checkpoint: ckpt.Committed, root: Path, log=print) -> Path:
    """Rank 0: ``ds_to_universal`` of a committed checkpoint into ``root/.universal/step_N``.

    Runs in this process with one worker (DeepSpeed's serial path: no fork of a process that holds
    a process group); the other ranks wait at a barrier."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    out = root / UNIVERSAL_DIR / checkpoint.tag
    shutil.rmtree(root / UNIVERSAL_DIR, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"resume: converting {checkpoint.path} to a universal checkpoint (world size or ZeRO stage changed)")
    args = argparse.Namespace(input_folder=str(checkpoint.path), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            ds_to_universal.main(args)
    except Exception as exc:
        raise ckpt.CheckpointError(
            f"{checkpoint.path}: conversion to a universal checkpoint failed: {type(exc).__name__}: {exc}"
        ) from exc
    return out


def load(engine, plan: ResumePlan, cfg: PipelineConfig, state: TrainState, rank: int, world: int) -> None:
    """Load the planned checkpoint into ``engine`` and ``state`` (all ranks together)."""
    import torch.distributed as dist

    latest, saved = plan.checkpoint, plan.saved
    if plan.universal:
        engine.load_checkpoint(str(checkpoint_root(cfg) / UNIVERSAL_DIR), tag=latest.tag,
                               load_module_strict=True, load_lr_scheduler_states=False)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(checkpoint_root(cfg) / UNIVERSAL_DIR, ignore_errors=True)
    else:
        from pipeline.security import weights_only_loads

        with weights_only_loads(latest.path):  # DeepSpeed itself would unpickle anything
            engine.load_checkpoint(str(latest.path.parent), tag=latest.tag, load_module_strict=True,
                                   load_lr_scheduler_states=False)
    saved_world = saved.get("world_size", world)
    rng_file = latest.path / f"rng_rank{rank}.pt"
    if saved_world == world and rng_file.is_file():
        from pipeline.security import weights_only_loads

        with weights_only_loads(latest.path):  # a refused pickle: an error naming the file
            torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    state.step, state.consumed_samples = saved["step"], saved["consumed_samples"]
    state.wandb_run_id = saved.get("wandb_run_id")
    state.skipped_batches = [list(r) for r in saved.get("skipped_batches", [])]
    state.skip_counts = dict(saved.get("skip_counts", {}))
    state.consecutive_skips = saved.get("consecutive_skips", 0)
    state.spike_history = list(saved.get("spike_history", []))
    state.data_segments = list(saved.get("data_segments", []))
    state.data_eras = list(saved.get("data_eras", []))
    state.segment_start_step = saved.get("segment_start_step", 0)
    digests = saved.get("sample_digests") or []
    if saved_world == world and len(digests) == world:
        state.sample_digest = digests[rank]
    else:  # a new world size: close the old segment, start a new chain here
        state.data_segments.append({"start_step": state.segment_start_step, "end_step": state.step,
                                    "world_size": saved_world, "sample_digests": digests})
        state.segment_start_step, state.sample_digest = state.step, empty_digest()


def settle_eras(state: TrainState, data, manifest_sha: str, seed: int, log=print) -> None:
    """Record the data eras of this run and make ``data`` (loader.BlendedSamples) sample by them.

    A fresh run (or one that resumes on the same dataset) has one era. A run resumed on a dataset
    grown by `prepare --append` starts a new era at the position it resumes from; positions before
    it keep the mapping they were trained with (eras.py)."""
    current = Era(0, manifest_sha, tuple(data.names), tuple(len(s) for s in data.sources), tuple(data.weights))
    eras = [Era.from_json(e) for e in state.data_eras]
    if not eras:
        eras = [current]
    elif eras[-1].manifest_sha256 == manifest_sha:
        eras[-1] = replace(current, start=eras[-1].start)  # blend weights may have changed
    else:
        start = state.next_trainable()
        new = replace(current, start=start)
        if start == eras[-1].start:  # the last era never trained a sample: the new one replaces it
            eras.pop()
        try:
            if eras:
                check_growth(eras[-1], new)
        except EraError as exc:
            raise ckpt.CheckpointError(f"the dataset changed in a way that would rewrite trained samples: {exc}") \
                from None
        eras.append(new)
        added = {n: m - dict(zip(eras[-2].sources, eras[-2].num_samples)).get(n, 0)
                 for n, m in zip(new.sources, new.num_samples)} if len(eras) > 1 else {}
        log(f"data: the dataset grew since the last checkpoint; era {len(eras) - 1} starts at sample "
            f"{start}: new training samples " + ", ".join(f"{n} +{a}" for n, a in added.items())
            + " (what was consumed is not re-shuffled)")
    state.data_eras = [e.to_json() for e in eras]
    data.eras = EraStream(eras, seed, data.names) if len(eras) > 1 else None
