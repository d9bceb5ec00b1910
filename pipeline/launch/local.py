"""Start ranks on this machine: our own torchrun, or a single-rank group in this process.

Which of the ways `pretrain train` runs (these two, under a launcher, on Ray Train) is decided in
`pipeline.launch.route`; this module only knows how to start processes here and keep them tied to
their parent (a rank must never outlive the process that holds the run lock).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.config import PipelineConfig, to_yaml
from pipeline.launch.env import cpu_or_cuda
from pipeline.rundir import RunDir


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
    except OSError:  # cannot tell: carry on (the parent was alive a moment ago)
        return True


# Runs a command that dies with its parent: PR_SET_PDEATHSIG survives exec. (A preexec_fn could do
# the same, but it runs between fork and exec while the lock heartbeat thread exists: it can deadlock.)
_DIE_WITH_PARENT = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); "
                    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.argv[2], sys.argv[2:])")


def dying_with_us(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so that the kernel SIGKILLs it when this process dies (Linux; elsewhere as is)."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


def write_resolved_config(cfg: PipelineConfig) -> Path:
    """The config every rank loads: validated once here, identical everywhere."""
    run = RunDir(cfg.run_dir)
    run.storage.write_atomic(RunDir.CONFIG, to_yaml(cfg))
    return run.config


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), e.g. the ranks torchrun started."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(stat.parent.name))
            except (OSError, ValueError, IndexError):
                continue
        return children


def run_torchrun(cfg: PipelineConfig) -> int:
    """Run `nproc_per_node` ranks of `pretrain train` on the resolved config.

    torchrun runs in its own session, so a signal sent to our process group (a terminal, `timeout`,
    a scheduler) reaches only us, and we decide where it goes: SIGTERM and SIGUSR1 (preemption) go
    straight to the ranks, which save, commit and exit 0, after which torchrun exits 0 as well. Had
    torchrun itself received SIGTERM it would tear the ranks down and exit non-zero. SIGINT goes to
    torchrun: stop now, no checkpoint.
    """
    config_path = write_resolved_config(cfg)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(cfg.train.nproc_per_node),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "pipeline.cli", "train", str(config_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("DS_ACCELERATOR", cpu_or_cuda())
    proc = subprocess.Popen(dying_with_us(cmd), env=env, start_new_session=True)

    def forward(signum, _frame):
        ranks = child_pids(proc.pid) if signum != signal.SIGINT else []
        for pid in ranks or [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

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
