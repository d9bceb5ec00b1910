"""`pretrain export`: a committed checkpoint → a transformers model directory."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import ModelConfig
from pipeline.rundir import DatasetDir, RunDir
from pipeline.train.checkpoint import TRAINER_STATE, WEIGHTS, CheckpointError, resolve_checkpoint

__all__ = ["export_hf", "resolve_checkpoint"]


def export_hf(checkpoint_path: str | Path, out_dir: str | Path, log=print) -> Path:
    from safetensors.torch import load

    from pipeline.models.hf import export_to_hf, hf_config

    checkpoint = resolve_checkpoint(checkpoint_path)  # verified against COMMIT
    model = checkpoint.state().model
    if model is None:
        raise CheckpointError(f"{checkpoint.path / TRAINER_STATE}: no model config recorded (written by an older "
                              f"version); export needs the resolved model config the weights were trained with")
    model_cfg = ModelConfig.model_validate(model)
    store = checkpoint.storage
    run_cfg = yaml.safe_load(store.read_text(RunDir.CONFIG))
    dataset = DatasetDir(run_cfg["data"]["output_dir"])
    found = dataset.storage.exists(DatasetDir.TOKENIZER)
    out = export_to_hf(
        load(store.read_bytes(WEIGHTS)), model_cfg, out_dir,
        tokenizer_json=dataset.storage.local_path(DatasetDir.TOKENIZER) if found else None,
    )
    log(f"export: {checkpoint.path} → {out} (transformers {hf_config(model_cfg)['architectures'][0]})"
        + ("" if found else f"; tokenizer not found at {dataset.tokenizer}, not copied"))
    return out
