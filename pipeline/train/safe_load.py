"""Loading DeepSpeed's pickles without running code from them.

DeepSpeed reads its ``.pt`` files with ``torch.load(weights_only=False)``, which runs arbitrary code
from a crafted pickle. Inside `weights_only_loads` every ``torch.load`` is forced to
``weights_only=True`` (PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), with only the few plain-data
DeepSpeed classes its checkpoints hold allow-listed. COMMIT hashes already refuse a file altered
after the commit; this also refuses a pickle whose COMMIT was rewritten to match.

Our own files never need unpickling: weights are ``model.safetensors``, RNG states are loaded
with ``weights_only=True``, and state is JSON.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
from pathlib import Path

from pipeline.train.records import CheckpointError

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
