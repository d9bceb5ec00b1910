"""`pretrain eval --watch`: evaluate every new committed checkpoint of a run, each exactly once.

A checkpoint is pending while it has a COMMIT marker and no eval.json; eval.json is written
atomically after its metrics are computed, so a watcher that is killed and restarted neither skips
nor repeats a checkpoint, and a lease on RUN_DIR/eval keeps a second watcher away. Pending
checkpoints are evaluated oldest first. While that lease is live, training's retention keeps up to
``eval.hold_unevaluated`` checkpoints the watcher has not scored yet; one it deletes anyway before
its turn (seen pending and gone, or noted by retention in RUN_DIR/eval/deleted_unevaluated.jsonl)
is reported by step when it is found, and again in the final summary.

The watcher stops by itself once a checkpoint at or past its target step is evaluated (the target:
``--until-step``, else the run's ``train.max_steps``), after ``--max-evals`` evaluations, or on
SIGTERM/SIGINT: the first signal lets the checkpoint in progress finish (its record is complete)
and the job exits 0, a second one aborts at once (no record is written for it, so it stays
pending): one line, exit 130 (SIGINT) or 143 (SIGTERM). A single `pretrain eval` (`evaluate_once`)
stops at the first signal the same way.

"In progress" starts when the job holds the eval lease: a first signal that lands while the job is
still starting (taking the lease, starting its heartbeat) lets the oldest pending checkpoint be
scored, exactly as one a moment later would. Otherwise the job would end within milliseconds and a
second signal sent right behind the first would meet the interpreter shutting down, where Python has
already put back the default action: the process died of SIGINT (-2) with no line at all. For the
same reason, once a signal has stopped the job, further signals are ignored until it has exited.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import Interrupted
from pipeline.launch.preamble import drop_own_lease
from pipeline.eval import EvalError
from pipeline.eval.evaluate import EvalOptions, EvalSession, check_options, evaluate, lease_settings, scorer
from pipeline.eval.records import EvalRecord, eval_lock, is_evaluated, load_records, run_config
from pipeline.rundir import RunDir
from pipeline.storage import StorageError, open_storage
from pipeline.train import checkpoint as ckpt
from pipeline.train.remote import pull_run


def pending(run_dir: str | Path) -> list[ckpt.Committed]:
    """Committed checkpoints without an eval.json, oldest first (a run on an object store: those
    on the store, fetched into this node's mirror first)."""
    pull_run(RunDir(run_dir), "unevaluated")
    return [c for c in ckpt.committed_checkpoints(RunDir(run_dir).checkpoints) if not is_evaluated(c.path)]


def target_step(run_dir: str | Path, until_step: int | None) -> int | None:
    if until_step is not None:
        return until_step
    cfg = run_config(run_dir)
    return cfg.train.max_steps if cfg is not None else None


def reached(run_dir: str | Path, target: int | None) -> bool:
    return target is not None and any(r.step >= target for r in load_records(run_dir))


class Abort(KeyboardInterrupt):
    """The signal that aborts an evaluation at once (``signum``: which)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, log=print):
    """First SIGINT/SIGTERM sets ``stop``; a second raises `Abort` (a KeyboardInterrupt)."""

    def handler(signum, _frame):
        if stop.is_set():
            raise Abort(signum)
        stop.set()
        log(f"eval --watch: {signal.Signals(signum).name}: stopping after the checkpoint in progress "
            f"(send it again to abort now)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def abort_on_signals():
    """SIGINT/SIGTERM raise `Abort` at once (a single evaluation has nothing to finish first)."""

    def handler(signum, _frame):
        raise Abort(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _aborted(exc: KeyboardInterrupt, what: str) -> Interrupted:
    signum = getattr(exc, "signum", signal.SIGINT)
    return Interrupted(signum, f"{signal.Signals(signum).name}: {what}")


def evaluate_once(run_dir: str | Path, step: int | None = None, options: EvalOptions = EvalOptions(),
                  **ray) -> EvalRecord:
    """`pretrain eval` without --watch: `evaluate`, and a signal ends it with one line (exit 130/143)
    before its record is written, so the next `pretrain eval` scores the checkpoint again."""
    try:
        with abort_on_signals():
            return evaluate(run_dir, step=step, options=options, **ray)
    except KeyboardInterrupt as exc:
        drop_own_lease(RunDir(run_dir).eval_lease)
        raise _aborted(exc, "stopped before the checkpoint was scored; nothing was recorded; run the same "
                            "command again") from None


class Missed:
    """Checkpoints retention deleted before this job evaluated them, each reported once by step."""

    def __init__(self, run_dir: str | Path, log):
        self.run, self.log = RunDir(run_dir), log
        self.steps: set[int] = set()

    def add(self, step: int, how: str) -> None:
        if step not in self.steps:
            self.steps.add(step)
            self.log(f"eval --watch: step {step} {how} before it was evaluated; skipped")

    def poll(self) -> None:
        """The steps retention noted while an eval job held the lease (this one, deleted between two
        polls and so never seen, or an earlier one): never evaluated, so said again in each summary."""
        store = self.run.storage
        if not store.exists(RunDir.EVAL_MISSED):
            return
        evaluated = {r.step for r in load_records(self.run.root)}
        for line in store.read_bytes(RunDir.EVAL_MISSED).decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
            if step not in evaluated:
                self.add(step, "was deleted by retention (eval.hold_unevaluated reached)")

    def summary(self) -> str:
        steps = ", ".join(map(str, sorted(self.steps)))
        return (f"not evaluated: steps {steps} (deleted by retention before their turn; raise "
                f"eval.hold_unevaluated or checkpoint.keep_last, or evaluate faster)")


def _evaluate_or_skip(checkpoint: ckpt.Committed, evaluate_one: Callable[[ckpt.Committed], EvalRecord],
                      log, missed: Missed | None = None) -> EvalRecord | None:
    """The checkpoint's record, or None (said once) when retention deleted it meanwhile or it is broken."""
    try:
        return evaluate_one(checkpoint)
    except (FileNotFoundError, StorageError, ckpt.CheckpointError) as exc:
        deleted = isinstance(exc, FileNotFoundError) or not open_storage(checkpoint.path).exists(ckpt.COMMIT)
        if deleted:
            if missed is not None:
                missed.add(checkpoint.step, f"({checkpoint.path}) was deleted by retention")
            else:
                log(f"eval --watch: {checkpoint.path} was deleted (retention) before it was evaluated; skipped")
        elif isinstance(exc, ckpt.CheckpointError):
            log(f"eval --watch: skipping step {checkpoint.step}: {exc}")
        else:
            raise
    return None


def watch_loop(run_dir: str | Path, evaluate_one: Callable[[ckpt.Committed], EvalRecord],
               stop: threading.Event, interval_s: float = 60.0, max_evals: int | None = None,
               until_step: int | None = None, log=print) -> list[EvalRecord]:
    """Poll for pending checkpoints and evaluate each; returns this invocation's results."""
    done: list[EvalRecord] = []
    skipped: set[int] = set()  # deleted or broken: reported once, retried only by the next eval job
    missed = Missed(run_dir, log)
    first_poll = True  # its oldest pending checkpoint is in progress even if a signal came in start-up
    while first_poll or not stop.is_set():
        for i, checkpoint in enumerate(pending(run_dir)):
            in_progress = first_poll and i == 0
            if (stop.is_set() and not in_progress) or (max_evals is not None and len(done) >= max_evals):
                break
            if checkpoint.step in skipped:
                continue
            result = _evaluate_or_skip(checkpoint, evaluate_one, log, missed)
            if result is None:
                skipped.add(checkpoint.step)
            else:
                done.append(result)
        first_poll = False
        missed.poll()
        if max_evals is not None and len(done) >= max_evals:
            log(f"eval --watch: {len(done)} checkpoint(s) evaluated (--max-evals); "
                + (f"{missed.summary()}; " if missed.steps else "") + "stopping")
            break
        target = target_step(run_dir, until_step)
        if reached(run_dir, target) and all(c.step in skipped for c in pending(run_dir)):
            tail = f"; {missed.summary()}" if missed.steps else ", every checkpoint up to it too"
            log(f"eval --watch: step {target} is evaluated{tail}; done")
            break
        stop.wait(interval_s)
    if stop.is_set() and missed.steps:
        log(f"eval --watch: stopped; {missed.summary()}")
    return done


def watch(run_dir: str | Path, options: EvalOptions = EvalOptions(), interval_s: float = 60.0,
          max_evals: int | None = None, until_step: int | None = None, use_ray: bool = False,
          ray_address: str | None = None, ray_gpus: float = 0.0, log=print) -> list[EvalRecord]:
    """The whole eval job of ``--watch``: lock, score (here or on Ray), record, log, stop cleanly."""
    if not RunDir(run_dir).storage.has_prefix(RunDir.CHECKPOINTS) and run_config(run_dir) is None:
        raise EvalError(f"{run_dir}: not a run directory (no {RunDir.CHECKPOINTS}/ and no {RunDir.CONFIG}); "
                        f"start `pretrain train` first, or check the path")
    if interval_s <= 0:
        raise EvalError(f"--interval-s must be positive, got {interval_s}")
    check_options(options)
    stop = threading.Event()
    session = EvalSession(run_dir, log)
    log(f"eval --watch: {run_dir}: evaluating new committed checkpoints every {interval_s:g}s "
        f"(Ctrl-C or SIGTERM stops)")
    try:
        with stop_on_signals(stop, log), eval_lock(run_dir, *lease_settings(run_dir)), \
                scorer(options, use_ray, ray_address, ray_gpus) as score:
            try:
                return watch_loop(run_dir, lambda c: session.record(score(c.path)), stop, interval_s,
                                  max_evals, until_step, log)
            finally:
                session.close()
    except KeyboardInterrupt as exc:
        drop_own_lease(RunDir(run_dir).eval_lease)
        raise _aborted(exc, "eval --watch aborted at once; the checkpoint in progress was not recorded and "
                            "stays pending for the next eval job") from None
    finally:
        if stop.is_set():
            _ignore_signals_until_exit()


def _ignore_signals_until_exit() -> None:
    """After a signal stopped the job, nothing is left to stop: a later signal would otherwise raise in
    the CLI's last lines (a traceback) or meet the interpreter's shutdown, which restores the default
    action and dies of the signal (-2) instead of ending with the job's line and exit code."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
