"""Nothing trusted blindly: what training checks before it reads data or unpickles a checkpoint.

- ``verify_inputs``: that the config trains on what the prepared dataset holds (its data section,
  sources and vocabulary: train/compat.py), the data manifest's sha256 of every shard, the COMMIT
  hashes of the checkpoint to resume from, and whether that checkpoint can continue this run at all
  (the one rule, train/compat.py: dataset, global batch, ZeRO stage, model, LR schedule), checked in
  the launching process before any rank or process group starts, so a flipped byte, a swapped file
  or an incompatible config stops the run with one line naming the file or the field.
- ``weights_only_loads`` (train/safe_load.py): every ``torch.load`` inside it is weights-only, so
  DeepSpeed's own loaders cannot run code from a crafted pickle.
"""

from __future__ import annotations

from pipeline.config import ConfigError
from pipeline.data.manifest import manifest_sha256, read_manifest, verify_manifest
from pipeline.rundir import DatasetDir
from pipeline.train import compat
from pipeline.train.checkpoint import CheckpointError
from pipeline.train.resume_point import resume_point
from pipeline.train.safe_load import weights_only_loads

__all__ = ["verify_inputs", "weights_only_loads"]


def check_config_against_data(cfg) -> None:
    """Raise ConfigError when ``cfg`` would not train on what the prepared dataset holds: its data
    section differs in a field that changes the data, a source is missing or extra, or
    model.vocab_size is smaller than the tokenizer's. Reads the manifest only (no hashing)."""
    manifest = read_manifest(cfg.data.output_dir)
    problems = compat.dataset_config_problems(cfg, manifest)
    if problems:
        raise ConfigError(compat.describe_dataset_problems(cfg, problems))
    if manifest.tokenizer.vocab_size is not None:
        compat.resolve_model_config(cfg.model, manifest.tokenizer.vocab_size)


def verify_inputs(cfg) -> None:
    """Raise ConfigError naming the field, or ManifestError / CheckpointError naming the file, if the
    config does not fit the prepared data, the data or the checkpoint to resume from differs from
    what was recorded (manifest.json, COMMIT), or that checkpoint cannot continue this run
    (`compat.resume_problems`, `compat.schedule_problem`). Reads files; starts nothing."""
    check_config_against_data(cfg)
    data_dir = DatasetDir(cfg.data.output_dir).root  # on an object store: this node's staged copy
    manifest = verify_manifest(data_dir)
    found = resume_point(cfg, verify=True)
    if found is None:
        return
    latest, saved = found
    problems = compat.resume_problems(cfg, saved, manifest, manifest_sha256(data_dir))
    if problems:
        raise CheckpointError(compat.describe(latest.path, problems))
    refusal = compat.schedule_problem(cfg, saved)
    if refusal:
        raise ConfigError(f"{latest.path}: {refusal}")
