"""`pretrain export`: a committed checkpoint → a transformers model directory."""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors.torch import load_file

from pipeline.config import ModelConfig
from pipeline.train import checkpoint as ckpt


def resolve_checkpoint(path: str | Path) -> ckpt.Committed:
    """A checkpoint directory, or a run directory (its newest committed checkpoint); verified."""
    path = Path(path)
    if (path / ckpt.COMMIT).is_file() or path.name.startswith("step_"):
        ckpt.verify_checkpoint(path)
        return ckpt.Committed(path, ckpt.committed_step(path))
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = ckpt.latest_committed(root, verify=True)
    if latest is None:
        raise ckpt.CheckpointError(f"{path}: no committed checkpoint found")
    return latest


def export_hf(checkpoint_path: str | Path, out_dir: str | Path, log=print) -> Path:
    from pipeline.models.hf import export_to_hf

    checkpoint = resolve_checkpoint(checkpoint_path)
    model_cfg = ModelConfig.model_validate(checkpoint.trainer_state()["model"])
    run_cfg = yaml.safe_load((checkpoint.path / "config.yaml").read_text(encoding="utf-8"))
    tokenizer = Path(run_cfg["data"]["output_dir"]) / "tokenizer.json"
    out = export_to_hf(
        load_file(str(checkpoint.path / "model.safetensors")), model_cfg, out_dir,
        tokenizer_json=tokenizer if tokenizer.is_file() else None,
    )
    log(f"export: {checkpoint.path} → {out} (transformers {'GPT2LMHeadModel' if model_cfg.arch == 'gpt' else 'BertForMaskedLM'})"
        + ("" if tokenizer.is_file() else f"; tokenizer not found at {tokenizer}, not copied"))
    return out
