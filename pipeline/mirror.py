"""Local mirrors of run and dataset directories that live on an object store.

A run or dataset directory given as ``s3://bucket/prefix`` is worked on through a local mirror on
each node (`pipeline.objstore.mirror_path`, under ``storage.cache_dir``): DeepSpeed, memory-mapped
shards and every reader keep their local files, and this module moves files between the mirror
and the store at the points where the store must know (a commit, the end of a command) and where a
command must see the store (its start). The store is the truth; a mirror is a cache that any node
may lose.

- `node_lock`: the ranks of one node take turns (``flock`` on a file in the mirror), so a node
  downloads a thing once and the others find it there.
- `SyncState` (``.mirror.json`` in the mirror): for each key, the ETag last seen on the store and
  the size/mtime of the local copy it matches, so unchanged files are neither fetched nor sent
  again and local files are not re-hashed.
- `pull_files` / `push_files`: the small files of a directory (logs, records, configs), whole:
  object stores cannot append, so a log is uploaded whole each time it changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.objstore import ObjectInfo, ObjectStorage
from pipeline.storage import LocalStorage, publish_local_file

STATE = ".mirror.json"
LOCK = ".mirror.lock"
#: never synced: the mirror's own files and local leases (an object store's lease is its own object)
LOCAL_ONLY = (STATE, LOCK, "run.lock.guard", "prepare.lock.guard")


@contextlib.contextmanager
def node_lock(root: Path) -> Iterator[None]:
    """One process of this node at a time works on the mirror at ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class SyncState:
    """What the mirror at ``root`` knows of each key: ``{"etag", "size", "mtime_ns", "sha256"}``."""

    def __init__(self, root: Path):
        self.root = root
        try:
            self.entries: dict[str, dict] = json.loads((root / STATE).read_text())
        except (OSError, ValueError):
            self.entries = {}

    def save(self) -> None:
        LocalStorage(self.root).write_atomic(STATE, json.dumps(self.entries, indent=0, sort_keys=True))

    def _stat(self, key: str) -> tuple[int, int] | None:
        try:
            st = (self.root / key).stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def local_unchanged(self, key: str) -> bool:
        """The local file is the one last synced (same size and mtime)."""
        entry, stat = self.entries.get(key), self._stat(key)
        return entry is not None and stat is not None and (entry.get("size"), entry.get("mtime_ns")) == stat

    def known_sha(self, key: str) -> str | None:
        """The sha256 of the local copy, when it is unchanged since it was recorded."""
        return self.entries[key].get("sha256") if self.local_unchanged(key) else None

    def record(self, key: str, etag: str | None = None, sha256: str | None = None) -> None:
        stat = self._stat(key)
        if stat is None:
            self.entries.pop(key, None)
            return
        entry = self.entries.setdefault(key, {})
        entry.update(size=stat[0], mtime_ns=stat[1])
        if etag is not None:
            entry["etag"] = etag
        if sha256 is not None:
            entry["sha256"] = sha256

    def forget(self, prefix: str) -> None:
        for key in [k for k in self.entries if k == prefix or k.startswith(prefix.rstrip("/") + "/")]:
            del self.entries[key]


def local_sha256(state: SyncState, key: str) -> str | None:
    """The sha256 of the local file ``key`` (from the state when unchanged), None when absent."""
    if not (state.root / key).is_file():
        return None
    known = state.known_sha(key)
    if known:
        return known
    digest = LocalStorage(state.root).sha256(key)
    state.record(key, sha256=digest)
    return digest


def fetch(store: ObjectStorage, state: SyncState, items: list[tuple[str, str | None, int | None]],
          workers: int = 16) -> int:
    """Download ``(key, sha256 or None, size)`` into the mirror, each verified when its sha is
    given, each written under a temporary name and renamed into place whole; bytes fetched."""
    if not items:
        return 0
    parts = [(key, state.root / f"{key}.part", sha, size) for key, sha, size in items]
    try:
        store.download_many(parts, workers=workers)
    except BaseException:
        for _, part, _, _ in parts:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        raise
    for key, part, sha, _ in parts:
        publish_local_file(part, state.root / key)
        state.record(key, sha256=sha or LocalStorage(state.root).sha256(key))
    return sum(size or 0 for *_, size in items)


def pull_files(store: ObjectStorage, state: SyncState, infos: dict[str, ObjectInfo]) -> list[str]:
    """Bring the mirror's copies of ``infos`` up to date with the store: a key whose ETag is the
    one last seen and whose local copy is unchanged is skipped. Returns the keys fetched."""
    todo = [info for key, info in infos.items()
            if not (state.entries.get(key, {}).get("etag") == info.etag and state.local_unchanged(key))]
    fetch(store, state, [(i.key, None, i.size) for i in todo])
    for info in todo:
        state.record(info.key, etag=info.etag)
    return [i.key for i in todo]


def push_files(store: ObjectStorage, state: SyncState, keys: Iterable[str]) -> list[str]:
    """Upload the local files ``keys`` that changed since they were last synced; the keys sent."""
    todo = [k for k in keys if (state.root / k).is_file() and not state.local_unchanged(k)]
    store.upload_many([(state.root / k, k) for k in todo])
    if todo:
        infos = store.infos()
        for key in todo:
            state.record(key, etag=infos[key].etag if key in infos else None)
    return todo


def local_files(root: Path, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Every file of the mirror at ``root`` worth sending (not the mirror's own, not in-flight
    ``.tmp``/``.part`` files, not under ``skip_prefixes``)."""
    keys = LocalStorage(root).list() if root.is_dir() else []
    return [k for k in keys if k not in LOCAL_ONLY and not k.endswith((".part", ".tmp"))
            and not any(k == p or k.startswith(p.rstrip("/") + "/") for p in skip_prefixes)]


def node_local_rank() -> int:
    """This process's rank on its node (torchrun, Ray Train and srun set it; 0 alone)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0
