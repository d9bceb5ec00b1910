"""`pretrain consolidate CKPT OUT.safetensors`: the full fp32 weights, rebuilt from DeepSpeed's state.

Every checkpoint already carries ``model.safetensors``, gathered by rank 0 at save time. This command
does not copy it: it rebuilds the weights from the engine state itself (DeepSpeed's ``zero_to_fp32``
merges the fp32 master partitions of ZeRO 1-3; ZeRO-0 keeps the full module in one file), checks
them bit for bit against ``model.safetensors``, and writes the rebuilt tensors. So a successful
consolidate proves that the sharded optimizer state and the exported weights agree — the check to
run before deleting DeepSpeed shards or archiving only the safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.train import checkpoint as ckpt


def fp32_from_deepspeed(checkpoint: ckpt.Committed, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the DeepSpeed files of one committed checkpoint."""
    if zero_stage == 0:
        files = sorted(checkpoint.path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ckpt.CheckpointError(f"{checkpoint.path}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint?)")
        module = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag))


def consolidate(checkpoint_path: str | Path, out: str | Path, log=print) -> Path:
    from safetensors.torch import load_file, save_file

    from pipeline.export import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint_path)  # verified against COMMIT
    stage = checkpoint.trainer_state().get("zero_stage")
    if stage is None:
        import yaml

        stage = yaml.safe_load((checkpoint.path / "config.yaml").read_text(encoding="utf-8"))["train"]["zero_stage"]
    from pipeline.security import weights_only_loads

    with weights_only_loads(checkpoint.path):  # zero_to_fp32 would unpickle anything
        rebuilt = fp32_from_deepspeed(checkpoint, stage)
    stored = load_file(str(checkpoint.path / "model.safetensors"))
    missing = sorted(set(stored) - set(rebuilt))
    if missing:
        raise ckpt.CheckpointError(f"{checkpoint.path}: the DeepSpeed state lacks {missing[:5]} of model.safetensors")
    differ = [k for k in stored if not torch.equal(stored[k], rebuilt[k].to(stored[k].dtype))]
    if differ:
        raise ckpt.CheckpointError(
            f"{checkpoint.path}: weights rebuilt from the DeepSpeed state differ from model.safetensors in "
            f"{len(differ)} tensors (first: {differ[0]}); the checkpoint is inconsistent"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: rebuilt[k].contiguous() for k in stored}, str(tmp), metadata={"step": str(checkpoint.step)})
    os.replace(tmp, out)
    log(f"consolidate: {checkpoint.path} (ZeRO-{stage}) → {out}: {len(stored)} tensors rebuilt from the "
        f"DeepSpeed state, identical to model.safetensors")
    return out
