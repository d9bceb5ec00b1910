"""`pretrain consolidate CKPT OUT.safetensors`: the full fp32 weights, rebuilt from DeepSpeed's state.

Every checkpoint already carries ``model.safetensors``, gathered by rank 0 at save time. This command
does not copy it: it rebuilds the weights from the engine state itself (DeepSpeed's ``zero_to_fp32``
merges the fp32 master partitions of ZeRO 1-3; ZeRO-0 keeps the full module in one file), checks
them bit for bit against ``model.safetensors``, and writes the rebuilt tensors. So a successful
consolidate proves that the sharded optimizer state and the exported weights agree — the check to
run before deleting DeepSpeed shards or archiving only the safetensors.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
import yaml

from pipeline.rundir import RunDir
from pipeline.storage import open_storage
from pipeline.train import checkpoint as ckpt
from pipeline.train.safe_load import weights_only_loads

ZERO0_MODULE = "mp_rank_*_model_states.pt"  # DeepSpeed's file holding the whole module under ZeRO-0


def fp32_from_deepspeed(checkpoint: ckpt.Committed, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the DeepSpeed files of one committed checkpoint."""
    if zero_stage == 0:
        store = checkpoint.storage
        files = [k for k in store.list() if "/" not in k and fnmatch.fnmatch(k, ZERO0_MODULE)]
        if not files:
            raise ckpt.CheckpointError(f"{checkpoint.path}: no {ZERO0_MODULE} (not a DeepSpeed checkpoint?)")
        module = torch.load(store.local_path(files[0]), map_location="cpu", weights_only=True)["module"]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag))


def zero_stage_of(checkpoint: ckpt.Committed) -> int:
    """The ZeRO stage the checkpoint was written with (older ones: from its config.yaml)."""
    stage = checkpoint.state().zero_stage
    if stage is None:
        stage = yaml.safe_load(checkpoint.storage.read_text(RunDir.CONFIG))["train"]["zero_stage"]
    return stage


def consolidate(checkpoint_path: str | Path, out: str | Path, log=print) -> Path:
    from safetensors.torch import load, save

    checkpoint = ckpt.resolve_checkpoint(checkpoint_path)  # verified against COMMIT
    stage = zero_stage_of(checkpoint)
    with weights_only_loads(checkpoint.path):  # zero_to_fp32 would unpickle anything
        rebuilt = fp32_from_deepspeed(checkpoint, stage)
    stored = load(checkpoint.storage.read_bytes(ckpt.WEIGHTS))
    missing = sorted(set(stored) - set(rebuilt))
    if missing:
        raise ckpt.CheckpointError(f"{checkpoint.path}: the DeepSpeed state lacks {missing[:5]} of {ckpt.WEIGHTS}")
    differ = [k for k in stored if not torch.equal(stored[k], rebuilt[k].to(stored[k].dtype))]
    if differ:
        raise ckpt.CheckpointError(
            f"{checkpoint.path}: weights rebuilt from the DeepSpeed state differ from {ckpt.WEIGHTS} in "
            f"{len(differ)} tensors (first: {differ[0]}); the checkpoint is inconsistent"
        )
    out = Path(out)
    tensors = save({k: rebuilt[k].contiguous() for k in stored}, metadata={"step": str(checkpoint.step)})
    open_storage(out.parent).write_atomic(out.name, tensors)
    log(f"consolidate: {checkpoint.path} (ZeRO-{stage}) → {out}: {len(stored)} tensors rebuilt from the "
        f"DeepSpeed state, identical to {ckpt.WEIGHTS}")
    return out
