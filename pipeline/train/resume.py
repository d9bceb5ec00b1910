"""Save and resume: how a run writes a checkpoint, and how it continues from the newest one.

A checkpoint (train/checkpoint.py's commit protocol) carries the engine state (weights, optimizer
moments), per-rank RNG states, ``model.safetensors``, the resolved ``config.yaml`` and
``trainer_state.json`` (train/records.py's `TrainerState`: the loop's `TrainState` plus the world
size, ZeRO stage, global batch and model it was written with). With them a resume continues bit for
bit on the same world size.

Before the engine is built, `plan_resume` reads the newest committed checkpoint and asks the one
compatibility rule (train/compat.py) whether it can continue this run; the launching process asked
the same rule before any rank started (security.verify_inputs).

Resuming on a different number of ranks (same global batch), or switching between ZeRO-1 and
ZeRO-2, goes through DeepSpeed universal checkpoints (ZeRO 1-3; a ZeRO-3 checkpoint stays ZeRO-3):
rank 0 converts the committed checkpoint with ``deepspeed.checkpoint.ds_to_universal`` into the run
directory's universal folder (RunDir.universal_dir) before the engine is built, every rank loads it
with ``checkpoint.load_universal``, then rank 0 deletes the copy. ZeRO-0 checkpoints hold the full
model and optimizer in one file and load on any world size directly.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import pipeline
from pipeline.config import ConfigError, PipelineConfig, to_yaml
from pipeline.data.eras import Era, EraError, EraStream, check_growth
from pipeline.data.manifest import Manifest
from pipeline.errors import DiskFull, PipelineError
from pipeline.models import state_dict_for_save
from pipeline.rundir import RunDir
from pipeline.storage import LocalStorage
from pipeline.train import checkpoint as ckpt
from pipeline.train import compat, remote
from pipeline.train.engine import UNIVERSAL_INFO
from pipeline.train.records import LRSchedule, TrainerState
from pipeline.train.resume_point import resume_point
from pipeline.train.safe_load import weights_only_loads
from pipeline.train.state import TrainState, empty_digest


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ---------------------------------------------------------------------------------------- save


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


@dataclass(frozen=True)
class SaveNotes:
    """What a save records beside the loop's state: the LR schedule the run follows, the signal that
    stops it (a preemption save), the `checkpoint.resume_from` step it descends from; and ``hold``,
    asked at the commit: how many unevaluated checkpoints retention keeps for a live eval job."""

    lr_schedule: LRSchedule | None = None
    stopped_by: str | None = None
    rewound_to: int | None = None
    hold: Callable[[], int | None] | None = None


def trainer_state(state: TrainState, cfg: PipelineConfig, world: int, digests: list[str], model: dict,
                  notes: SaveNotes = SaveNotes()) -> TrainerState:
    """What ``trainer_state.json`` records: the loop's state, every rank's sample digest, and what
    the checkpoint was written with (the compatibility rule reads these)."""
    fields = asdict(state)
    fields.pop("sample_digest")  # this rank's only; every rank's is in sample_digests
    return TrainerState(**fields, world_size=world, sample_digests=digests, zero_stage=cfg.train.zero_stage,
                        global_batch_size=cfg.train.global_batch_size, code_version=pipeline.__version__,
                        model=model, lr_schedule=notes.lr_schedule, stopped_by=notes.stopped_by,
                        rewound_to=notes.rewound_to)


def _write_shared_files(staged: LocalStorage, cfg: PipelineConfig, saved: TrainerState, weights) -> None:
    """Rank 0: the files every reader of a checkpoint needs without DeepSpeed."""
    from safetensors.torch import save as safetensors_bytes

    staged.write_atomic(ckpt.WEIGHTS, safetensors_bytes(weights))
    staged.write_atomic(RunDir.CONFIG, to_yaml(cfg))
    staged.write_atomic(ckpt.TRAINER_STATE, saved.to_json())


#: how torch's zip writer reports a failed write (it names neither the file nor errno)
_WRITE_FAILED = ("iostream error", "file write failed", "unexpected pos", "PytorchStreamWriter")


def _out_of_space(exc: BaseException, free: int, needs: int | None) -> bool:
    """Whether a failed write was the disk filling up: ENOSPC/EDQUOT anywhere in the chain, or torch's
    writer failing while less is free than a checkpoint needs."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(exc, RuntimeError) and any(w in str(exc) for w in _WRITE_FAILED) and free < (needs or 1 << 20)


@contextlib.contextmanager
def _space_checked(store: LocalStorage, staged: str, step: int, needs: int | None, rank: int):
    """A write of the checkpoint that fails for lack of space becomes one `DiskFull` line; rank 0
    drops the staged files (nothing of them was committed) so the space is free again."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        free = shutil.disk_usage(store.local_path()).free
        if not _out_of_space(exc, free, needs):
            raise
        where = getattr(exc, "filename", None) or store.path(staged)
        committed = store.exists(f"{ckpt.tag_for(step)}/{ckpt.COMMIT}")
        with contextlib.suppress(OSError, PipelineError):  # what is free once the partial files are gone
            partial = store.child(staged)
            free += sum(partial.size(k) for k in partial.list())
        if rank == 0 and not committed:
            with contextlib.suppress(OSError):
                store.delete_tree(staged)
        after = (f"; step {step} was committed, but what follows the commit failed" if committed else
                 f"; nothing was committed (step {step} is not saved): free space or lower checkpoint.keep_last, "
                 f"then run the same command to resume from the newest committed checkpoint")
        raise DiskFull(where, needs, free, after) from None


def save(engine, cfg: PipelineConfig, state: TrainState, rank: int, world: int,
         notes: SaveNotes = SaveNotes()) -> Path | None:
    """Write and commit ``step_N`` (all ranks call this together); returns its path on rank 0."""
    import torch.distributed as dist

    from pipeline.models.flops import param_count

    run = RunDir(cfg.run_dir)
    store = run.checkpoint_storage
    staged = store.staging_for(ckpt.tag_for(state.step))
    store.makedirs()
    needs = ckpt.checkpoint_bytes(run.checkpoints, param_count(engine.module.cfg), cfg.train.precision)
    checked = lambda: _space_checked(store, staged, state.step, needs, rank)  # noqa: E731
    if rank == 0:
        store.delete_tree(staged)  # an earlier attempt that died before its commit
        remote.clear_step(run, state.step)
    dist.barrier()
    with checked():
        engine.save_checkpoint(str(store.local_path()), tag=staged, client_state=UNIVERSAL_INFO, save_latest=False)
        with store.child(staged).open_atomic(rng_file(rank)) as f:
            torch.save({"torch": torch.get_rng_state()}, f)
    digests = [None] * world
    dist.all_gather_object(digests, state.sample_digest)
    weights = _weights(engine, cfg.train.zero_stage)
    final = None
    if rank == 0:
        saved = trainer_state(state, cfg, world, digests, engine.module.cfg.model_dump(mode="json"), notes)
        with checked():
            _write_shared_files(store.child(staged), cfg, saved, weights)
    dist.barrier()  # every rank's files are written before the commit
    if run.remote:  # one upload per node, then COMMIT on the store lists every node's objects
        listings = [None] * world
        dist.all_gather_object(listings, remote.upload_node_files(run, staged, state.step, cfg.storage.workers))
        if rank == 0:
            remote.commit_remote(run, state.step, listings, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every_steps,
                                 hold=notes.hold() if notes.hold else None)
    if rank == 0:
        with checked():
            final = ckpt.commit(run.checkpoints, store.path(staged), state.step, cfg.checkpoint.keep_last,
                                cfg.checkpoint.keep_every_steps, hold=notes.hold() if notes.hold else None)
    dist.barrier()
    return final


# ---------------------------------------------------------------------------------------- resume


@dataclass(frozen=True)
class ResumePlan:
    """What the newest committed checkpoint needs from the engine before it is built."""

    checkpoint: ckpt.Committed | None
    saved: TrainerState | None
    universal: bool  # load through a universal conversion (world size or ZeRO stage changed)


def plan_resume(cfg: PipelineConfig, world: int, manifest_sha: str, verify: bool = True,
                manifest: Manifest | None = None) -> ResumePlan:
    """Read the checkpoint to resume from (``verify``: against its COMMIT hashes) and check with
    `compat.resume_problems` that it can continue this run on the dataset ``manifest`` (whose sha256
    is ``manifest_sha``); raise CheckpointError listing every problem (ConfigError: a schedule change
    the config refuses)."""
    found = resume_point(cfg, verify=verify)
    if found is None:
        return ResumePlan(None, None, False)
    latest, saved = found
    problems = compat.resume_problems(cfg, saved, manifest, manifest_sha)
    if problems:
        raise ckpt.CheckpointError(compat.describe(latest.path, problems))
    refusal = compat.schedule_problem(cfg, saved)
    if refusal:
        raise ConfigError(f"{latest.path}: {refusal}")
    stage = cfg.train.zero_stage
    saved_stage = saved.zero_stage if saved.zero_stage is not None else stage
    saved_world = saved.world_size if saved.world_size is not None else world
    return ResumePlan(latest, saved, stage > 0 and (saved_world != world or saved_stage != stage))


def convert_to_universal(checkpoint: ckpt.Committed, run: RunDir, log=print) -> Path:
    """Rank 0: ``ds_to_universal`` of a committed checkpoint into ``run.universal_dir``.

    Runs in this process with one worker (DeepSpeed's serial path: no fork of a process that holds
    a process group); the other ranks wait at a barrier."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    store = run.checkpoint_storage
    store.delete_tree(RunDir.UNIVERSAL)
    store.makedirs(RunDir.UNIVERSAL)
    out = run.universal_dir / checkpoint.tag
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


def _saved_world(saved: TrainerState, world: int) -> int:
    return saved.world_size if saved.world_size is not None else world


def load(engine, plan: ResumePlan, cfg: PipelineConfig, state: TrainState, rank: int, world: int) -> None:
    """Load the planned checkpoint into ``engine`` and ``state`` (all ranks together)."""
    import torch.distributed as dist

    latest, run = plan.checkpoint, RunDir(cfg.run_dir)
    if plan.universal:
        remote.share_universal(run, latest.tag, rank)  # on an object store: every node gets rank 0's conversion
        engine.load_checkpoint(str(run.universal_dir), tag=latest.tag, load_module_strict=True,
                               load_lr_scheduler_states=False)
        dist.barrier()
        remote.drop_universal(run, rank)
    else:
        with weights_only_loads(latest.path):  # DeepSpeed itself would unpickle anything
            engine.load_checkpoint(str(latest.path.parent), tag=latest.tag, load_module_strict=True,
                                   load_lr_scheduler_states=False)
    store = latest.storage
    if _saved_world(plan.saved, world) == world and store.exists(rng_file(rank)):
        # a refused pickle: an error naming the file
        with weights_only_loads(latest.path), store.open_read(rng_file(rank)) as f:
            torch.set_rng_state(torch.load(f, weights_only=True)["torch"])
    restore(state, plan.saved, rank, world)


def restore(state: TrainState, saved: TrainerState, rank: int, world: int) -> None:
    """The loop's state from ``trainer_state.json``; a new world size closes the digest segment."""
    state.step, state.consumed_samples = saved.step, saved.consumed_samples
    state.wandb_run_id = saved.wandb_run_id
    state.skipped_batches = [list(r) for r in saved.skipped_batches]
    state.skip_counts = dict(saved.skip_counts)
    state.consecutive_skips = saved.consecutive_skips
    state.spike_history = list(saved.spike_history)
    state.data_segments = [s.to_dict() for s in saved.data_segments]
    state.data_eras = [dict(e) for e in saved.data_eras]
    state.segment_start_step = saved.segment_start_step
    saved_world, digests = _saved_world(saved, world), list(saved.sample_digests)
    if saved_world == world and len(digests) == world:
        state.sample_digest = digests[rank]
    else:  # a new world size: close the old segment, start a new chain here
        state.data_segments.append({"start_step": state.segment_start_step, "end_step": state.step,
                                    "world_size": saved_world, "sample_digests": digests})
        state.segment_start_step, state.sample_digest = state.step, empty_digest()


# ---------------------------------------------------------------------------------------- data eras


def settle_eras(state: TrainState, data, manifest_sha: str, seed: int, log=print) -> EraStream | None:
    """Record the data eras of this run in ``state``; return the stream ``data``
    (loader.BlendedSamples) must sample by, None while the run has one era (the plain blend).

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
        _grow(eras, replace(current, start=state.next_trainable()), log)
    state.data_eras = [e.to_json() for e in eras]
    return EraStream(eras, seed, data.names) if len(eras) > 1 else None


def _grow(eras: list[Era], new: Era, log) -> None:
    """Append the era of a grown dataset (in place), refusing one that would rewrite trained samples."""
    if new.start == eras[-1].start:  # the last era never trained a sample: the new one replaces it
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
        f"{new.start}: new training samples " + ", ".join(f"{n} +{a}" for n, a in added.items())
        + " (what was consumed is not re-shuffled)")
