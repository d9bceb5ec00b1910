"""What the environment says about how this process was started: by a launcher or not, which rank,
which accelerator. Pure reads of ``os.environ`` (or a mapping given for tests); imports nothing of ours,
so every launch module can use it without importing another."""

from __future__ import annotations

import os
from collections.abc import Mapping


def under_launcher(env: Mapping[str, str] | None = None) -> bool:
    """torchrun, deepspeed, accelerate and Ray Train set RANK; srun sets SLURM_PROCID."""
    env = os.environ if env is None else env
    return "RANK" in env or "SLURM_PROCID" in env


def global_rank(env: Mapping[str, str] | None = None) -> str:
    """This process's global rank under torchrun (RANK) or srun (SLURM_PROCID); "0" otherwise."""
    env = os.environ if env is None else env
    return env.get("RANK", env.get("SLURM_PROCID", "0"))


def cuda_driver_devices() -> int | None:
    """GPUs the CUDA driver offers this process (it honours CUDA_VISIBLE_DEVICES), asked through
    libcuda without importing torch (a second instead of a few); None where there is no driver
    library at all (then torch cannot use CUDA either), 0 where the driver answers none or fails."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "libcuda.dylib"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_available() -> bool:
    """Whether ranks started here can use CUDA: no driver library → no; the driver's own answer when
    it names devices; torch's when the driver says none (torch is the judge the engine uses)."""
    devices = cuda_driver_devices()
    if devices is None:
        return False
    if devices > 0:
        return True
    import torch

    return torch.cuda.is_available()


def cpu_or_cuda() -> str:
    """The DeepSpeed accelerator for ranks we start: cuda when this machine has one (asked of the
    driver first, so that a parent on a machine without CUDA never imports torch)."""
    return "cuda" if cuda_available() else "cpu"
