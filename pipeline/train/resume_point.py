"""Which committed checkpoint a run resumes from, and the way out when it cannot be used.

The newest committed checkpoint, unless ``checkpoint.resume_from`` names an earlier step: then the
newer ones that do not descend from that rewind are set aside (`rewind`, by the process holding the
run lock, before anything resumes) and ignored by every rank (`resume_candidates`). A checkpoint a
run resumed with ``resume_from`` = S writes records ``rewound_to`` = S, so the setting rewinds once:
a restart with it still set continues from what the rewound run saved since.

Imports neither torch nor DeepSpeed: the parent `pretrain train` asks it before any rank starts.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from pipeline.train import checkpoint as ckpt
from pipeline.train.records import TrainerState


def _descends(checkpoint: ckpt.Committed, step: int) -> bool:
    """Whether a checkpoint was written by a run resumed with checkpoint.resume_from=``step``."""
    try:
        return checkpoint.state().rewound_to == step
    except PipelineError:  # unreadable: not one of ours
        return False


def resume_candidates(cfg: PipelineConfig) -> tuple[list[ckpt.Committed], list[ckpt.Committed]]:
    """(the committed checkpoints a resume may start from, oldest first; those to set aside).

    With ``checkpoint.resume_from`` = S, a checkpoint newer than S is set aside unless a run resumed
    from S wrote it (``rewound_to``): so the setting rewinds once, and a restart with it still set
    continues from what the rewound run saved since."""
    root = RunDir(cfg.run_dir).checkpoints
    found = ckpt.committed_checkpoints(root)
    s = cfg.checkpoint.resume_from
    if s is None:
        return found, []
    aside = [c for c in found if c.step > s and not _descends(c, s)]
    usable = [c for c in found if c not in aside]
    if not any(c.step >= s for c in usable):
        have = ", ".join(str(c.step) for c in found) or "none"
        raise ConfigError(f"checkpoint.resume_from={s}: no committed checkpoint at step {s} under {root} "
                          f"(committed steps: {have}); pick one of them, or unset it to resume from the newest")
    return usable, aside


def fallback_hint(root: Path, bad: ckpt.Committed) -> str:
    """The way out when the checkpoint a run would resume from cannot be used."""
    older = [c.step for c in ckpt.committed_checkpoints(root) if c.step < bad.step]
    if older:
        return (f"; to resume from an earlier checkpoint run it again with --set checkpoint.resume_from="
                f"{older[-1]} (committed: {', '.join(map(str, older))}), or move {bad.path} aside")
    return f"; no earlier committed checkpoint to fall back to: move {bad.path} aside to start from step 0"


def resume_point(cfg: PipelineConfig, verify: bool = True) -> tuple[ckpt.Committed, TrainerState] | None:
    """The checkpoint this run resumes from and its state (``verify``: against its COMMIT hashes),
    None for a fresh start. A broken one is refused with the way to fall back."""
    usable, _ = resume_candidates(cfg)
    if not usable:
        return None
    latest = usable[-1]
    try:
        if verify:
            ckpt.verify_checkpoint(latest.path)
        return latest, latest.state()
    except ckpt.CheckpointError as exc:
        hint = fallback_hint(RunDir(cfg.run_dir).checkpoints, latest)
        if isinstance(exc, ckpt.CorruptCheckpoint):
            raise ckpt.CorruptCheckpoint(exc.path, exc.why + hint) from None
        raise ckpt.CheckpointError(f"{exc}{hint}") from None


def rewind(cfg: PipelineConfig, log=print) -> list[Path]:
    """Set aside what `resume_candidates` says to (the caller holds the run lock); their new paths."""
    usable, aside = resume_candidates(cfg)
    root = RunDir(cfg.run_dir).checkpoints
    moved = [ckpt.set_aside(root, c) for c in aside]
    if moved:
        log(f"resume: checkpoint.resume_from={cfg.checkpoint.resume_from}: set aside "
            f"{', '.join(c.tag for c in aside)} (newer, not from this rewind) into {moved[0].parent}; resuming "
            f"from step {usable[-1].step}")
    return moved
