"""Nothing trusted blindly: what training checks before it reads data or unpickles a checkpoint.

- ``verify_inputs``: the data manifest's sha256 of every shard, the newest committed checkpoint's
  COMMIT hashes, and whether that checkpoint can continue this run at all (the one rule,
  train/compat.py: dataset, global batch, ZeRO stage, model), checked in the launching process
  before any rank or process group starts, so a flipped byte, a swapped file or an incompatible
  config stops the run with one line naming the file.
- ``weights_only_loads`` (train/safe_load.py): every ``torch.load`` inside it is weights-only, so
  DeepSpeed's own loaders cannot run code from a crafted pickle.
"""

from __future__ import annotations

from pipeline.data.manifest import manifest_sha256, verify_manifest
from pipeline.rundir import RunDir
from pipeline.train import compat
from pipeline.train.checkpoint import CheckpointError, latest_committed
from pipeline.train.safe_load import weights_only_loads

__all__ = ["verify_inputs", "weights_only_loads"]


def verify_inputs(cfg) -> None:
    """Raise ManifestError / CheckpointError naming the file if the data or the checkpoint to resume
    from differs from what was recorded (manifest.json, COMMIT), or if that checkpoint cannot
    continue this run (`compat.resume_problems`). Reads files; starts nothing."""
    manifest = verify_manifest(cfg.data.output_dir)
    latest = latest_committed(RunDir(cfg.run_dir).checkpoints, verify=True)
    if latest is None:
        return
    problems = compat.resume_problems(cfg, latest.state(), manifest, manifest_sha256(cfg.data.output_dir))
    if problems:
        raise CheckpointError(compat.describe(latest.path, problems))
