"""What every way of training does around the ranks, in one place.

`guarded` runs the work of a route (start torchrun, train in this process, fit on Ray Train, train as
one rank of a launcher's group) inside the same three rules:

1. a firing after the last step does nothing: the newest committed checkpoint is at train.max_steps
   (`lock.budget_spent`), so say so and exit 0 (scheduled runs fire whether or not work is left);
2. the run lock is held around everything that writes the run directory, and a parent verifies the
   inputs (manifest, the checkpoint to resume) under it, before any rank starts, so a corrupt file is
   one line here and not a traceback from every rank;
3. training that stopped itself (`Halted`) ends with one line and the halt's exit code; the last
   committed checkpoint is intact.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

from pipeline.errors import Halted
from pipeline.launch import lock
from pipeline.rundir import RunDir

Work = Callable[[object], int]  # gets what the lock context yields (a RunLock, or None for no lock)


def guarded(cfg, work: Work, *, who: str, hold: Callable[[], contextlib.AbstractContextManager], verify: bool,
            say: Callable[[str], None] = print) -> int:
    """``work(held)`` under the preamble; its exit code, 0 when there is nothing to do.

    ``who`` prefixes every line (``pretrain train``, ``ray train``); ``hold`` makes the lock context;
    ``verify``: this process is the parent of the ranks, so it checks the inputs for them (ranks of a
    launcher's group check their own on resume, rather than each re-hashing everything here)."""
    spent = lock.budget_spent(cfg)
    if spent:
        say(f"{who}: {spent}")
        return 0
    with hold() as held:
        took_over = getattr(held, "took_over", None)
        if took_over is not None:
            say(f"{who}: took over a stale run lock of pid {took_over.pid} on {took_over.host}")
        if verify:
            from pipeline.security import verify_inputs

            verify_inputs(cfg)
        try:
            return work(held)
        except Halted as exc:
            print(f"{who}: stopped: {exc}", file=sys.stderr)
            return exc.exit_code


def tidy_finished(cfg) -> None:
    """A finished run's checkpoints as a commit would have left them (``latest``, retention), in
    case the process crashed right after its last commit; skipped while another process holds it."""
    from pipeline.train import checkpoint as ckpt

    with contextlib.suppress(lock.RunLocked), lock.run_lock(*lease(cfg)):
        ckpt.tidy(RunDir(cfg.run_dir).checkpoints, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every_steps)


def lease(cfg) -> tuple[str, float, float]:
    """run_lock's arguments for ``cfg``: the run directory and its lease timings."""
    return cfg.run_dir, cfg.launch.lock_lease_s, cfg.launch.lock_heartbeat_s
