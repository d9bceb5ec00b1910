"""Nothing trusted blindly: what training checks before it reads data or unpickles a checkpoint.

- ``verify_inputs``: the data manifest's sha256 of every shard and the newest committed
  checkpoint's COMMIT hashes, checked in the launching process before any rank or process group
  starts, so a flipped byte or a swapped file stops the run with one line naming the file.
- ``weights_only_loads``: DeepSpeed reads its ``.pt`` files with ``torch.load(weights_only=False)``,
  which runs arbitrary code from a crafted pickle. Inside this context every ``torch.load`` is
  forced to ``weights_only=True`` (PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), with only the few
  plain-data DeepSpeed classes its checkpoints hold allow-listed. COMMIT hashes already refuse a file
  altered after the commit; this also refuses a pickle whose COMMIT was rewritten to match.

Our own files never need unpickling: weights are ``model.safetensors``, RNG states are loaded
with ``weights_only=True``, and state is JSON.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
from pathlib import Path

from pipeline.train.checkpoint import CheckpointError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# plain-data classes inside DeepSpeed's ZeRO checkpoints (no code runs when they are restored)
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list:
    found = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: one class fewer to allow
            continue
    return found


def _refused_file(directory: Path) -> Path | None:
    """The first ``.pt`` file under ``directory`` that a weights-only load refuses."""
    import torch

    with torch.serialization.safe_globals(_safe_globals()):
        for path in sorted(Path(directory).rglob("*.pt")):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                return path
            except Exception:  # noqa: BLE001 - not a pickle problem; the loader reports it
                continue
    return None


@contextlib.contextmanager
def weights_only_loads(checkpoint_dir: str | Path):
    """Every ``torch.load`` inside is weights-only; a refused pickle is a CheckpointError naming it."""
    import torch

    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    except pickle.UnpicklingError as exc:
        culprit = _refused_file(Path(checkpoint_dir)) or Path(checkpoint_dir)
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{culprit}: refused to unpickle: it holds objects other than tensors and plain data "
            f"({first[:200]}); the checkpoint was tampered with or comes from an untrusted source"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous


def verify_inputs(cfg) -> None:
    """Raise ManifestError / CheckpointError naming the file if the data or the checkpoint to resume
    from differs from what was recorded (manifest.json, COMMIT), or if that checkpoint was trained
    on another dataset. Reads files; starts nothing."""
    from pipeline.data.manifest import manifest_sha256, same_or_grown, verify_manifest
    from pipeline.train.checkpoint import latest_committed

    manifest = verify_manifest(cfg.data.output_dir)
    latest = latest_committed(Path(cfg.run_dir) / "checkpoints", verify=True)
    if latest is not None:
        trained_on = latest.trainer_state().get("data_manifest_sha256")
        if trained_on and not same_or_grown(manifest, manifest_sha256(cfg.data.output_dir), trained_on):
            raise CheckpointError(
                f"{latest.path}: was trained on a different dataset than {cfg.data.output_dir} (manifest "
                f"sha256 {trained_on[:12]}… vs {manifest_sha256(cfg.data.output_dir)[:12]}…); use a new "
                f"run_dir or the original data.output_dir (to add data to a run, grow its dataset with "
                f"`pretrain prepare --append`)"
            )
