"""Start ranks on this machine: our own torchrun, or a single-rank group in this process.

Which of the ways `pretrain train` runs (these two, under a launcher, on Ray Train) is decided in
`pipeline.launch.route`; this module only knows how to start processes here and keep them tied to
their parent (a rank must never outlive the process that holds the run lock).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.config import PipelineConfig, to_yaml
from pipeline.errors import Interrupted, PipelineError
from pipeline.launch.env import cpu_or_cuda
from pipeline.rundir import RunDir
from pipeline.train.preemption import REPORTS_ENV, first_error, ready_ranks
from pipeline.train.restarts import LAUNCH_ENV


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
    """Run `nproc_per_node` ranks of `pretrain train` on the resolved config; torchrun's exit code.

    torchrun runs in its own session, so a signal sent to our process group (a terminal, `timeout`,
    a scheduler) reaches only us, and `_Supervisor` decides where it goes: SIGTERM, SIGUSR1 and SIGINT
    go straight to the ranks once they have their handlers, and they save, commit and exit 0, after
    which torchrun exits 0 as well (had torchrun itself received SIGTERM it would tear the ranks down
    and exit non-zero). Before the ranks have handlers, or at a second Ctrl-C, the ranks are stopped
    at once. An error a rank reports ends the job with that one line and its exit code.
    """
    config_path = write_resolved_config(cfg)
    restarts = cfg.launch.max_restarts
    # A restart (launch.max_restarts) needs a new store for the process group in each round, or a
    # restarted rank may read the address a dead rank published before: c10d rendezvous with the
    # store not shared does that; without restarts the static rendezvous is all there is to it.
    rendezvous = (["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"] if restarts
                  else ["--master-addr", "127.0.0.1", "--master-port", str(free_port())])
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(cfg.train.nproc_per_node), "--max-restarts", str(restarts),
        *rendezvous, "-m", "pipeline.cli", "train", str(config_path),
    ]
    with tempfile.TemporaryDirectory(prefix="pretrain-ranks-") as reports:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   **{REPORTS_ENV: reports, LAUNCH_ENV: f"torchrun-{uuid.uuid4().hex[:12]}"})
        if restarts:
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        env.setdefault("DS_ACCELERATOR", cpu_or_cuda())
        proc = subprocess.Popen(dying_with_us(cmd), env=env, start_new_session=True)
        supervisor = _Supervisor(proc, reports, cfg.train.nproc_per_node)
        previous = {s: signal.signal(s, supervisor.on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        try:
            return supervisor.wait(cfg)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class _Supervisor:
    """Our torchrun and its ranks: where a signal goes, and what the job's end says."""

    POLL_S = 0.05

    def __init__(self, proc: subprocess.Popen, reports: str, nproc: int):
        self.proc, self.reports, self.nproc = proc, reports, nproc
        self.forwarded: int | None = None  # the signal passed to the ranks
        self.stopped: tuple[int, str] | None = None  # (signal, why) when we stopped the ranks ourselves

    def _kill(self) -> None:
        """SIGKILL the ranks and torchrun's session (a rank still importing has no PR_SET_PDEATHSIG yet)."""
        for pid in [*child_pids(self.proc.pid), -self.proc.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def on_signal(self, signum, _frame) -> None:
        if self.stopped is not None:
            return
        if self.forwarded is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: stop now
                self.stopped = (signum, "second")
                self._kill()
            return
        if ready_ranks(self.reports) < self.nproc:  # a rank without handlers would die of it, loudly
            self.stopped = (signum, "start-up")
            self._kill()
            return
        self.forwarded = signum
        for pid in child_pids(self.proc.pid) or [self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def wait(self, cfg: PipelineConfig) -> int:
        while True:
            try:
                rc = self.proc.wait(self.POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.stopped is None and first_error(self.reports) is not None:
                ranks = child_pids(self.proc.pid)
                self._kill()  # before torchrun prints its report of the failure over it
                rc = self.proc.wait()
                _drop_unfinished_saves(cfg, ranks)
                break
        reported = first_error(self.reports)
        if reported is not None and self.stopped is None:
            raise _reported_error(reported)
        return self._ending(cfg, rc)

    def _ending(self, cfg: PipelineConfig, rc: int) -> int:
        if self.stopped is not None:
            signum, why = self.stopped
            name = signal.Signals(signum).name
            if why == "start-up":
                raise Interrupted(signum, f"{name} during start-up, before the ranks were ready: stopped them; "
                                          f"{resumes_from(cfg)}")
            raise Interrupted(signum, f"second {name}: stopped the ranks at once; {resumes_from(cfg)}")
        if self.forwarded == signal.SIGINT and rc == 0:
            raise Interrupted(signal.SIGINT, f"SIGINT: saved and stopped; {resumes_from(cfg)}")
        return rc


def _drop_unfinished_saves(cfg: PipelineConfig, ranks: list[int], patience_s: float = 5.0) -> None:
    """Once the killed ranks are gone, delete the staging trees of saves newer than the newest commit
    (nothing of them was committed, and a full disk gets its space back)."""
    from pipeline.rundir import staged_step_of
    from pipeline.storage import STAGING_PREFIX
    from pipeline.train.checkpoint import latest_committed

    deadline = time.monotonic() + patience_s
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    store = RunDir(cfg.run_dir).checkpoint_storage
    newest = latest_committed(RunDir(cfg.run_dir).checkpoints, verify=False)
    for name in store.children():
        step = staged_step_of(name)
        if name.startswith(STAGING_PREFIX) and step is not None and step > (newest.step if newest else -1):
            with contextlib.suppress(OSError):
                store.delete_tree(name)


def resumes_from(cfg: PipelineConfig) -> str:
    """The end of a line about a stopped run: where the same command goes on from."""
    from pipeline.train.checkpoint import latest_committed

    newest = latest_committed(RunDir(cfg.run_dir).checkpoints, verify=False)
    if newest is None:
        return "no checkpoint is committed yet: the same command starts from step 0"
    return f"the same command resumes from step {newest.step} ({newest.path})"


def _reported_error(report: dict) -> PipelineError:
    """The error a rank reported, as the one line (and exit code) it would have printed itself."""
    err = PipelineError(report.get("message", "a rank failed"))
    err.exit_code = int(report.get("exit_code", 1))
    err.prefix_error = bool(report.get("prefix_error", True))
    return err


def run_single_process(cfg: PipelineConfig, hold=None) -> dict:
    """One rank in this process; ``hold``: see `pipeline.train.loop.train`."""
    from pipeline.train.loop import train

    os.environ.setdefault("DS_ACCELERATOR", cpu_or_cuda())
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    try:
        return train(cfg, hold=hold)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
