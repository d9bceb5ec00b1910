"""Start training on this machine: in-process, under our own torchrun, or inside a launcher's group.

`pretrain train` works three ways with one code path:
- started by a launcher (torchrun, deepspeed, accelerate, srun, Ray Train): RANK/WORLD_SIZE are in
  the environment (or SLURM_PROCID), so this process is one rank and trains directly;
- ``train.nproc_per_node`` > 1 and no launcher: we start torchrun ourselves on the resolved config;
- one process and no launcher: a single-rank group on this process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.config import PipelineConfig, to_yaml


def cpu_or_cuda() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent_marker: str) -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies, so a rank never outlives
    the launcher that holds the run lock (an orphan would keep writing checkpoints while the next
    `pretrain train` takes the stale lock over). False when the parent, recognised by
    ``parent_marker`` in its command line, is already gone. Elsewhere a no-op returning True."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    try:
        return parent_marker.encode() in Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return False


def _pdeathsig_preexec():
    """A preexec_fn for Popen: the child dies with the calling process (resolved before fork)."""
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def preexec():
        prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec if sys.platform.startswith("linux") else None


def write_resolved_config(cfg: PipelineConfig) -> Path:
    """The config every rank loads: validated once here, identical everywhere."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def run_torchrun(cfg: PipelineConfig) -> int:
    """Run `nproc_per_node` ranks of `pretrain train` on the resolved config; forwards signals."""
    config_path = write_resolved_config(cfg)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(cfg.train.nproc_per_node),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "pipeline.cli", "train", str(config_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("DS_ACCELERATOR", cpu_or_cuda())
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_pdeathsig_preexec())  # torchrun dies with us

    def forward(signum, _frame):
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_single_process(cfg: PipelineConfig) -> dict:
    from pipeline.train.loop import train

    os.environ.setdefault("DS_ACCELERATOR", cpu_or_cuda())
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    try:
        return train(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
