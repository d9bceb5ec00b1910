"""Atomic checkpoints: only a checkpoint with a valid COMMIT marker exists for anyone.

Saving: every rank writes into the staging tree of ``step_N`` (storage.staging_for: locally
``.tmp-step_N``) → barrier → rank 0 publishes it as ``step_N`` (locally a rename; on an object
store the files are already there), writes ``COMMIT`` (the sha256 of every file, written atomically
and fsynced), then points ``latest`` at it, then applies retention. ``COMMIT`` is the commit point:
a crash at any moment leaves either a staging tree or a ``step_N`` without ``COMMIT``; both are
ignored by resume and eval, and swept on the next save. ``latest`` is a hint, never the truth.

Each checkpoint holds the DeepSpeed engine state, ``model.safetensors`` (the full fp32 weights,
readable without DeepSpeed or unpickling), ``trainer_state.json`` (train/records.py, written by train/resume.py), ``config.yaml``
and per-rank RNG states. Every file a load reads is listed in COMMIT; a file found in a committed
checkpoint that COMMIT does not list (other than the eval record written after the commit) is
refused, so nothing can be slipped in for DeepSpeed's globbing loaders to pick up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.rundir import RunDir, staged_step_of, step_of, tag_for
from pipeline.storage import LocalStorage, open_storage
from pipeline.train.records import CheckpointError, Commit, CorruptCheckpoint, TrainerState

COMMIT = RunDir.COMMIT
LATEST = RunDir.LATEST
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"  # the full fp32 weights, gathered by rank 0 at save time
#: written into a committed checkpoint afterwards, by the eval job; never read by a load
AFTER_COMMIT = (RunDir.EVAL_JSON,)

__all__ = ["COMMIT", "LATEST", "CheckpointError", "CorruptCheckpoint", "Commit", "Committed", "tag_for",
           "committed_step", "committed_checkpoints", "verify_checkpoint", "latest_committed", "commit", "tidy",
           "retained_steps", "apply_retention", "staging_dir", "resolve_checkpoint", "held_for_eval", "set_aside",
           "checkpoint_bytes"]


def _written_after_commit(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    in_flight = base.endswith(".tmp") and any(base.lstrip(".").startswith(f"{a}.") for a in AFTER_COMMIT)
    return base in AFTER_COMMIT or in_flight


@dataclass(frozen=True)
class Committed:
    path: Path
    step: int

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def storage(self) -> LocalStorage:
        return open_storage(self.path)

    def commit_record(self) -> Commit:
        return Commit.from_json(self.storage.read_bytes(COMMIT), str(self.path / COMMIT))

    def state(self) -> TrainerState:
        """The typed ``trainer_state.json``."""
        return TrainerState.from_json(self.storage.read_bytes(TRAINER_STATE), str(self.path / TRAINER_STATE))

    def trainer_state(self) -> dict:
        """``trainer_state.json`` as JSON (validated): for scripts and tests."""
        return self.state().to_dict()


def committed_step(path: Path) -> int:
    step = step_of(Path(path).name)
    if step is None:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a name like step_00000100)")
    return step


def committed_checkpoints(root: str | Path) -> list[Committed]:
    """Checkpoints under ``root`` that carry a COMMIT marker, oldest first (hashes not checked)."""
    store = open_storage(root)
    found = []
    for name in store.children():
        step = step_of(name)
        if step is not None and store.exists(f"{name}/{COMMIT}"):
            found.append(Committed(store.path(name), step))
    return sorted(found, key=lambda c: c.step)


def verify_checkpoint(path: str | Path) -> Commit:
    """Check every file listed in COMMIT against its sha256, and that nothing unlisted was added;
    raise CheckpointError naming the file."""
    path = Path(path)
    store = open_storage(path)
    marker = path / COMMIT
    if not store.exists(COMMIT):
        raise CheckpointError(f"{path}: not committed (no {COMMIT} marker); it was never finished")
    record = Commit.from_json(store.read_bytes(COMMIT), str(marker))
    for name, expected in record.files.items():
        if not store.inside(name):
            raise CheckpointError(f"{marker}: entry {name!r} points outside the checkpoint")
        file = store.path(name).resolve()
        if not store.exists(name):
            raise CheckpointError(f"{file}: listed in {COMMIT} but missing")
        if store.sha256(name) != expected:
            raise CorruptCheckpoint(file, f"sha256 does not match {COMMIT}; the checkpoint was altered after "
                                          f"it was committed")
    unlisted = [k for k in store.list() if k != COMMIT and k not in record.files and not _written_after_commit(k)]
    if unlisted:
        raise CheckpointError(f"{store.path(unlisted[0])}: in the checkpoint but not listed in {COMMIT} (added "
                              f"after the commit); a load would read it unverified: remove it")
    return record


def latest_committed(root: str | Path, verify: bool = True) -> Committed | None:
    found = committed_checkpoints(root)
    if not found:
        return None
    if verify:
        verify_checkpoint(found[-1].path)
    return found[-1]


def _fsync_write(store: LocalStorage, key: str, text: str) -> None:
    store.write_atomic(key, text, fsync=True)


def commit(root: Path, tmp_dir: Path, step: int, keep_last: int, keep_every_steps: int | None = None,
           hold: int | None = None) -> Path:
    """Rank 0, after every rank has written into ``tmp_dir``: publish it as step N. ``hold``: see
    `apply_retention`."""
    store = open_storage(root)
    tag = tag_for(step)
    store.publish(Path(tmp_dir).name, tag)  # an earlier attempt that died before COMMIT is replaced
    files = {name: store.sha256(f"{tag}/{name}") for name in store.child(tag).list()}
    _fsync_write(store, f"{tag}/{COMMIT}", Commit(step=step, files=files).to_json())
    _fsync_write(store, LATEST, tag + "\n")
    apply_retention(root, keep_last, keep_every_steps, hold=hold)
    return store.path(tag)


def tidy(root: str | Path, keep_last: int, keep_every_steps: int | None = None, hold: int | None = None) -> None:
    """Finish what a crash after the newest commit left undone (``latest`` not yet pointing at it,
    retention cut short); a later commit would do it, but a finished run has none."""
    store = open_storage(root)
    newest = latest_committed(root, verify=False)
    if newest is None:
        return
    latest = store.read_text(LATEST).strip() if store.exists(LATEST) else None
    if latest != newest.tag:
        _fsync_write(store, LATEST, newest.tag + "\n")
    apply_retention(root, keep_last, keep_every_steps, hold=hold)


def retained_steps(steps: list[int], keep_last: int, keep_every_steps: int | None = None) -> set[int]:
    """Which committed steps retention keeps: the newest ``keep_last``, plus every multiple of
    ``keep_every_steps`` (kept forever, e.g. for later evaluation or a rewind)."""
    steps = sorted(steps)
    keep = set(steps[-keep_last:]) if keep_last else set(steps)
    if keep_every_steps:
        keep |= {s for s in steps if s % keep_every_steps == 0}
    return keep


def held_for_eval(found: list[Committed], keep: set[int], hold: int | None) -> set[int]:
    """Steps retention would delete but keeps for a live eval job: the oldest ``hold`` of them that
    have no eval record yet (the job evaluates oldest first). ``hold`` None: no eval job runs."""
    if not hold:
        return set()
    waiting = [c.step for c in found if c.step not in keep and not c.storage.exists(RunDir.EVAL_JSON)]
    return set(waiting[:hold])


def _note_unevaluated(root: Path, old: Committed) -> None:
    """While an eval job runs, a checkpoint deleted before it was evaluated is noted for it to report."""
    run = RunDir(Path(root).parent)
    run.storage.append_text(RunDir.EVAL_MISSED, json.dumps({"step": old.step, "time": round(time.time(), 3)}) + "\n")


def apply_retention(root: Path, keep_last: int, keep_every_steps: int | None = None,
                    hold: int | None = None) -> list[Path]:
    """Delete committed checkpoints that `retained_steps` does not keep, and debris (uncommitted
    trees) older than the newest committed one. Nothing newer than that is touched: a save in
    flight stays. ``hold``: an eval job is running on the run (its lease is live) and up to this many
    checkpoints it has not evaluated yet are kept beyond ``keep_last`` (`held_for_eval`); None: none
    runs."""
    store = open_storage(root)
    found = committed_checkpoints(root)
    keep = retained_steps([c.step for c in found], keep_last, keep_every_steps)
    keep |= held_for_eval(found, keep, hold)
    removed = []
    for old in found:
        if old.step not in keep:
            if hold is not None and not old.storage.exists(RunDir.EVAL_JSON):
                _note_unevaluated(root, old)
            store.delete(f"{old.tag}/{COMMIT}")  # first: a crash mid-delete leaves debris, not a broken commit
            store.delete_tree(old.tag)
            removed.append(old.path)
    newest = found[-1].step if found else -1
    for name in store.children():
        step = staged_step_of(name)
        if step is not None and step < newest and not store.exists(f"{name}/{COMMIT}"):
            store.delete_tree(name)
            removed.append(store.path(name))
    return removed


def staging_dir(root: str | Path, step: int) -> Path:
    """Where the ranks write step ``step`` before `commit` publishes it."""
    store = open_storage(root)
    return store.path(store.staging_for(tag_for(step)))


def resolve_checkpoint(path: str | Path) -> Committed:
    """A checkpoint directory, or a run directory (its newest committed checkpoint); verified
    against COMMIT. For the commands that take either (export, consolidate)."""
    path = Path(path)
    if open_storage(path).exists(COMMIT) or path.name.startswith("step_"):
        verify_checkpoint(path)
        return Committed(path, committed_step(path))
    run = RunDir(path)
    latest = latest_committed(run.checkpoints if run.storage.has_prefix(run.CHECKPOINTS) else path, verify=True)
    if latest is None:
        raise CheckpointError(f"{path}: no committed checkpoint found")
    return latest


def set_aside(root: str | Path, checkpoint: Committed) -> Path:
    """Move a committed checkpoint out of the way (``checkpoints/.aside/step_N.TIME``): no resume, eval
    or retention sees it any more, and its files stay for a person to inspect. COMMIT moves first, so
    a crash midway leaves uncommitted debris behind, never a second committed copy."""
    store = open_storage(root)
    dest = f"{RunDir.ASIDE}/{checkpoint.tag}.{int(time.time())}"
    keys = store.child(checkpoint.tag).list()
    for key in sorted(keys, key=lambda k: k != COMMIT):
        store.move(f"{checkpoint.tag}/{key}", f"{dest}/{key}")
    store.delete_tree(checkpoint.tag)
    return store.path(dest)


def checkpoint_bytes(root: str | Path, n_params: int | None = None, precision: str = "fp32") -> int | None:
    """About how many bytes one checkpoint takes: the newest committed one's size, else an estimate
    from the parameter count (fp32 weights, DeepSpeed's model states, the fp32 master copy and Adam's
    two moments: ~20 bytes a parameter, 18 in fp16), None when neither is known."""
    newest = latest_committed(root, verify=False)
    if newest is not None:
        store = newest.storage
        return sum(store.size(k) for k in store.list())
    if n_params is None:
        return None
    return n_params * (18 if precision == "fp16" else 20)
