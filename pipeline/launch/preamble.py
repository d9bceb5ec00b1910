"""What every way of training does around the ranks, in one place.

`guarded` runs the work of a route (start torchrun, train in this process, fit on Ray Train, train as
one rank of a launcher's group) inside the same rules:

1. a firing after the last step does nothing: the newest committed checkpoint is at train.max_steps
   (`lock.budget_spent`), so say so and exit 0 (scheduled runs fire whether or not work is left);
2. the run lock is held around everything that writes the run directory, and a parent verifies the
   inputs (manifest, the config against the prepared dataset, the checkpoint to resume) under it,
   before any rank starts, so a corrupt file or a mismatch is one line here and not a traceback from
   every rank; what needs no lock (paths, the device, `check_before_start`) is checked before it;
3. training that stopped itself (`Halted`) ends with one line and the halt's exit code; the last
   committed checkpoint is intact;
4. the lock holder writes the resolved config it runs (RUN_DIR/config.yaml) and how the run ended
   (`RunEnd`, RUN_DIR/last_run.json), so `pretrain status`
   can tell a run that stopped, was preempted or interrupted from one that is running (its lease is
   live) or crashed (its lease was left behind by a dead holder).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable

from pipeline.config import ConfigError, to_yaml
from pipeline.errors import Halted, Interrupted, PipelineError
from pipeline.launch import lock
from pipeline.records import Record
from pipeline.rundir import RunDir
from pipeline.storage import open_storage

Work = Callable[[object], int]  # gets what the lock context yields (a RunLock, or None for no lock)


class RunEnd(Record):
    """``RUN_DIR/last_run.json``: how the last `pretrain train` on the run ended."""

    outcome: str  # finished | stopped | preempted | interrupted | halted | failed
    exit_code: int
    time: float
    step: int | None = None  # the newest committed checkpoint then
    signal: str | None = None
    message: str = ""
    host: str = ""
    pid: int = 0


def read_run_end(run_dir) -> RunEnd | None:
    """The last run's end record, None when none was written (or it cannot be read)."""
    store = RunDir(run_dir).storage
    if not store.exists(RunDir.LAST_RUN):
        return None
    try:
        return RunEnd.from_json(store.read_bytes(RunDir.LAST_RUN), str(store.path(RunDir.LAST_RUN)))
    except PipelineError:  # half-written by a dying holder: as if none
        return None


def _newest(cfg):
    from pipeline.train import checkpoint as ckpt

    try:
        newest = ckpt.latest_committed(RunDir(cfg.run_dir).checkpoints, verify=False)
        return newest, newest.state() if newest else None
    except PipelineError:
        return None, None


def _outcome(cfg, code: int, exc: BaseException | None) -> RunEnd:
    newest, state = _newest(cfg)
    step = newest.step if newest else None
    end = dict(exit_code=code, time=round(time.time(), 3), step=step, host=socket.gethostname(), pid=os.getpid())
    if isinstance(exc, Interrupted):
        import signal

        return RunEnd(outcome="interrupted", signal=signal.Signals(exc.signum).name, message=str(exc), **end)
    if isinstance(exc, Halted):
        return RunEnd(outcome="halted", message=str(exc), **end)
    if exc is not None or code:
        return RunEnd(outcome="failed", message=str(exc or f"exit code {code}"), **end)
    if state is not None and state.stopped_by:
        return RunEnd(outcome="preempted", signal=state.stopped_by, **end)
    return RunEnd(outcome="finished" if step is not None and step >= cfg.train.max_steps else "stopped", **end)


def _record_end(cfg, held, code: int, exc: BaseException | None = None) -> None:
    """The lock holder notes how the run ended (best effort: a full disk must not hide the real error)."""
    if not isinstance(held, lock.RunLock):
        return
    with contextlib.suppress(OSError, PipelineError):
        RunDir(cfg.run_dir).storage.write_atomic(RunDir.LAST_RUN, _outcome(cfg, code, exc).to_json())


def guarded(cfg, work: Work, *, who: str, hold: Callable[[], contextlib.AbstractContextManager], verify: bool,
            say: Callable[[str], None] = print, halt_raises: bool = False) -> int:
    """``work(held)`` under the preamble; its exit code, 0 when there is nothing to do.

    ``who`` prefixes every line (``pretrain train``, ``ray train``); ``hold`` makes the lock context;
    ``verify``: this process is the parent of the ranks, so it checks the inputs for them (ranks of a
    launcher's group check their own on resume, rather than each re-hashing everything here);
    ``halt_raises``: a halt propagates (a rank that reports to its parent) instead of being said here."""
    spent = lock.budget_spent(cfg)
    if spent:
        say(f"{who}: {spent}")
        return 0
    with hold() as held:
        if isinstance(held, lock.RunLock):  # the holder, on every route: RUN_DIR/config.yaml is what ran
            RunDir(cfg.run_dir).storage.write_atomic(RunDir.CONFIG, to_yaml(cfg))
        took_over = getattr(held, "took_over", None)
        if took_over is not None:
            say(f"{who}: took over a stale run lock of pid {took_over.pid} on {took_over.host}")
        if verify:
            from pipeline.security import verify_inputs

            verify_inputs(cfg)
        try:
            code = work(held)
        except Halted as exc:
            _record_end(cfg, held, exc.exit_code, exc)
            if halt_raises:
                raise
            print(f"{who}: stopped: {exc}", file=sys.stderr)
            return exc.exit_code
        except BaseException as exc:
            _record_end(cfg, held, getattr(exc, "exit_code", 1), exc)
            raise
        _record_end(cfg, held, code)
        return code


# ---------------------------------------------------------------------------- before the lock


def check_paths(cfg) -> None:
    """Paths that cannot work, refused naming the field: a run_dir or data.output_dir that is (or lies
    under) a file, a data.tokenizer.path that is not there."""
    from pathlib import Path

    from pipeline.objstore import is_uri

    for field, value in (("run_dir", cfg.run_dir), ("data.output_dir", cfg.data.output_dir)):
        if is_uri(value):
            open_storage(value).check()  # the bucket, the credentials, the endpoint: one line if wrong
            continue
        path = Path(value)
        for p in (path, *path.parents):
            if p.name and open_storage(p.parent).exists(p.name):
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                raise ConfigError(f"{field}: {path} {what}, not a directory; point {field} at a directory "
                                  f"(or move the file away)")
    tok = cfg.data.tokenizer.path
    if tok and not is_uri(tok) and not open_storage(Path(tok).parent).exists(Path(tok).name):
        raise ConfigError(f"data.tokenizer.path: {tok} does not exist; fix the path, or unset it to train a "
                          f"tokenizer (the prepared dataset keeps its own copy as tokenizer.json)")


def check_device(cfg) -> None:
    """What the ranks started on this machine need from it (fp16 needs CUDA), before any starts;
    asks the CUDA driver, not torch, so the parent's checks stay within a second or two."""
    from pipeline.launch.env import cuda_available
    from pipeline.train.compat import precision_problem

    if cfg.train.precision != "fp16":  # the only precision that needs a GPU
        return
    problem = precision_problem(cfg.train.precision, cuda_available())
    if problem:
        raise ConfigError(problem)


def check_before_start(cfg) -> None:
    """What a parent checks for the ranks it starts here, before the lock (`check_paths` came first):
    the batch split over train.nproc_per_node ranks, and the device."""
    cfg.gradient_accumulation_steps(cfg.train.nproc_per_node)
    check_device(cfg)


def rewind(cfg, log=print) -> None:
    """``checkpoint.resume_from``: set the checkpoints that do not descend from it aside, under the
    run lock, before the budget is judged or anything resumes (train/resume_point.py decides which)."""
    from pipeline.train import resume_point

    with lock.run_lock(*lease(cfg)):
        resume_point.rewind(cfg, log=log)


def eval_hold(cfg) -> Callable[[], int | None]:
    """For retention at each commit: ``eval.hold_unevaluated`` while an eval job's lease on RUN_DIR/eval
    is live, else None (no eval job runs, nothing to hold for)."""
    eval_dir = RunDir(cfg.run_dir).eval_lease
    host = socket.gethostname()

    def hold() -> int | None:
        info = lock.read_lease(eval_dir)
        live = info is not None and not lock.is_stale(info, time.time(), host)
        return cfg.eval.hold_unevaluated if live else None

    return hold


def tidy_finished(cfg) -> None:
    """A finished run's checkpoints as a commit would have left them (``latest``, retention), in
    case the process crashed right after its last commit; skipped while another process holds it."""
    from pipeline.train import checkpoint as ckpt

    with contextlib.suppress(lock.RunLocked), lock.run_lock(*lease(cfg)):
        ckpt.tidy(RunDir(cfg.run_dir).checkpoints, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every_steps,
                  hold=eval_hold(cfg)())


def drop_own_lease(directory) -> None:
    """A signal that stopped this process while it was taking a lease (after the file was written,
    before the holder could release it) leaves the lease behind: delete it if it names this process."""
    info = lock.read_lease(directory)
    if info is not None and info.pid == os.getpid() and info.host == socket.gethostname():
        with contextlib.suppress(OSError, PipelineError):
            open_storage(directory).delete(lock.LOCK_FILE)


def lease(cfg) -> tuple[str, float, float, bool]:
    """run_lock's arguments for ``cfg``: the run directory, its lease timings, whether to lock at all."""
    return cfg.run_dir, cfg.launch.lock_lease_s, cfg.launch.lock_heartbeat_s, cfg.launch.lock


def stage_inputs(cfg, log=print) -> None:
    """A run or dataset on an object store: this node's mirror of the run (small files, the newest
    committed checkpoint, the one ``checkpoint.resume_from`` names) and of the dataset, verified,
    before anything reads them. One process per node downloads; the others find it done."""
    from pipeline.data.staging import stage_dataset
    from pipeline.rundir import DatasetDir
    from pipeline.train import remote

    run = RunDir(cfg.run_dir)
    if run.remote:
        steps = "all" if cfg.checkpoint.resume_from is not None else "newest"
        remote.pull_run(run, steps, log=log)
    stage_dataset(DatasetDir(cfg.data.output_dir), workers=cfg.storage.workers, log=log)


def push_outputs(cfg) -> None:
    """At exit: the run's small files (last_run.json, logs, W&B's offline folder) reach the store,
    and how many requests had to be retried is told."""
    from pipeline.objstore import RETRIES
    from pipeline.train import remote

    run = RunDir(cfg.run_dir)
    if not run.remote:
        return
    remote.push_run(run)
    if RETRIES.summary():
        print(RETRIES.summary(), flush=True)
