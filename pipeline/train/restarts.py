"""Automatic restarts: which start of its launch this group is, and the record of a restart.

A launcher that restarts a failed group (torchrun ``--max-restarts``, Ray Train
``FailureConfig(max_failures)``; see ``launch.max_restarts``) starts every rank again, on every
node; the ranks resume from the last committed checkpoint as on any start. Rank 0 counts the
starts of its launch in the run directory (`RunDir.launch_starts`), so the count is the group's,
whichever node failed (torchrun's own ``TORCHELASTIC_RESTART_COUNT`` is per node: the node whose
rank died counts the restart, the others do not). A launch is named by ``LAUNCH_ENV`` (our own
torchrun and the Ray Train driver set it), else, under torchrun, by the Slurm job and its requeue
count or by torchrun's rendezvous id; a process no launcher restarts counts nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pipeline.rundir import RunDir

LAUNCH_ENV = "PRETRAIN_LAUNCH_ID"
METRIC = "launch/restart"


def launch_id(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    if env.get(LAUNCH_ENV):
        name = env[LAUNCH_ENV]
    elif "TORCHELASTIC_RUN_ID" not in env:  # no torchrun: nothing restarts this process
        return None
    elif env.get("SLURM_JOB_ID"):  # torchrun in a Slurm job; a requeued job is a new launch
        name = f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_RESTART_COUNT') or 0}"
    elif env["TORCHELASTIC_RUN_ID"] != "none":
        name = f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    else:
        return None
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def count_start(run_dir: str, env: Mapping[str, str] | None = None) -> int:
    """Rank 0, once per start: note it; 0 on the launch's first start, N on its N-th restart."""
    name = launch_id(env)
    if name is None:
        return 0
    store, key = RunDir(run_dir).storage, RunDir.launch_starts(name)
    before = int(store.read_text(key)) if store.exists(key) else 0
    store.write_atomic(key, f"{before + 1}\n")
    return before


def record_restart(tracker, say, n: int, step: int, resumed_from: str | None, max_restarts: int) -> None:
    """After the resume of restart ``n``: one line and a ``launch/restart`` row (metrics.jsonl and
    W&B) at the first step the restarted group trains (W&B drops rows below a resumed run's last step)."""
    if n == 0:
        return
    origin = f"resumed from {resumed_from} at step {step}" if resumed_from else "no checkpoint yet: from step 0"
    say(f"train: automatic restart {n} of {max_restarts} (launch.max_restarts) after a failed rank; {origin}")
    tracker.log({METRIC: n}, step=step + 1)
