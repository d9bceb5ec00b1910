"""`pretrain prepare` around its stages: the dataset lock, signals, and the checks before any work.

One `prepare` (or `prepare --append`) writes a dataset directory at a time: two at once would
interleave their shards and one of them could print "done" over a dataset whose files fail their
hashes. The CLI passes ``hold``, the lease lock on ``data.output_dir`` (the run lock of `pretrain
train`, on ``DatasetDir.LOCK``), and the second process stops with `DatasetLocked` (exit 3) naming
the holder. Inside it, SIGINT and SIGTERM end the run in one line (interrupt.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import ContextManager

from pipeline.config import ConfigError, DataConfig
from pipeline.data.interrupt import interruptible
from pipeline.data.manifest import MANIFEST, Manifest
from pipeline.data.staging import pull_prepared, push_dataset
from pipeline.errors import LockHeld
from pipeline.rundir import DatasetDir


class DatasetLocked(LockHeld):
    """Another live `pretrain prepare` holds the dataset directory's lease."""

    def __init__(self, root: str | Path, holder: str | None, lock_path: str | Path):
        who = holder or "another process (it has just released it: run again)"
        super().__init__(
            f"{root} is being prepared by {who}; a second prepare would interleave its shards with the "
            f"first one's. Wait for it to finish, or, if that process is gone, for its lease to expire "
            f"(delete {lock_path} only if you are sure it is dead)")


def check_output_dir(cfg: DataConfig) -> None:
    """data.output_dir must be a directory (or not exist yet), before the lock is taken in it (for a
    URI: its local mirror, where the stages write)."""
    out = DatasetDir(cfg.output_dir).root
    if out.exists() and not out.is_dir():
        raise ConfigError(f"data.output_dir: {out} is an existing file, not a directory; point data.output_dir "
                          f"at a directory (it is created if missing)")


def run_prepare(cfg: DataConfig, hold: Callable[[], ContextManager], *, append: bool = False,
                force: bool = False, ray_address: str | None = None) -> Manifest:
    """`pretrain prepare [--append] [--force]`: under the dataset lock ``hold()``, interruptible."""
    from pipeline.data.append import append as append_files, refuse_rebuild
    from pipeline.data.prepare import prepare

    check_output_dir(cfg)
    what = "prepare --append" if append else "prepare"
    resumes = ("the dataset is as it was before this append; run it again" if append else
               f"the next `pretrain prepare` resumes from the stages already finished ({DatasetDir.STAGES}/)")
    ds = DatasetDir(cfg.output_dir)
    with interruptible("pretrain prepare", what, resumes, until_exit=True), hold():
        pull_prepared(ds)  # a dataset on an object store: what it holds already, into this node's mirror
        if append:
            manifest = append_files(cfg, ray_address=ray_address)
        else:
            if not force:
                refuse_rebuild(cfg)
            manifest = prepare(cfg, ray_address=ray_address, force=force)
            _retract_stale_manifest(ds)
        push_dataset(ds)  # every changed file, the manifest last: the commit point on the store
        return manifest


def _retract_stale_manifest(ds: DatasetDir) -> None:
    """Before a rebuilt dataset goes up: the store's old manifest is deleted first, so while the new
    shards overwrite the old ones no manifest on the store lists files that no longer match it (an
    append keeps every old file, so its old manifest stays valid until the grown one replaces it)."""
    if not ds.remote:
        return
    store, local = ds.remote_storage, ds.storage
    mine = local.read_bytes(MANIFEST) if local.exists(MANIFEST) else None
    if store.exists(MANIFEST) and store.read_bytes(MANIFEST) != mine:
        store.delete(MANIFEST)


def lease_lock(lock, read_holder: Callable[[], object | None]) -> Callable[[], ContextManager]:
    """``hold`` for `run_prepare` from a lease lock (launch/lock.py's RunLock on DatasetDir.LOCK) and
    a function reading its current holder: busy → `DatasetLocked` naming the holder."""

    @contextlib.contextmanager
    def hold():
        try:
            lock.acquire()
        except LockHeld:
            holder = read_holder()
            raise DatasetLocked(lock.run_dir, holder.describe(time.time()) if holder else None, lock.path) from None
        stale = lock.took_over
        if stale is not None:
            print(f"prepare: took over the stale lock of pid {stale.pid} on {stale.host} (it is gone, or its "
                  f"lease ran out): {lock.path}", flush=True)
        try:
            yield lock
        finally:
            lock.release()

    return hold
