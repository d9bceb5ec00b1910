"""A dataset on an object store (``data.output_dir: s3://…``): staged into each node's cache to be
read, published to the store when prepared.

`stage_dataset` (train, eval, plan): the store's ``manifest.json`` names every file with its
sha256; each file not already in the node's cache with that hash is downloaded (in parallel, large
files in ranges), verified, and renamed into place; the local manifest is written last, so a
staging cut short is never mistaken for a dataset. One process per node downloads (a file lock);
the node's other ranks find the files there. A restart reuses every file whose hash still matches
(hashes are remembered with the file's size and mtime, so nothing is re-read either). The shards
are then memory-mapped locally as for a local dataset.

`push_dataset` (prepare): every file of the prepared mirror goes up, the manifest last: the
dataset exists on the store once its manifest does, as on a disk.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.data.manifest import MANIFEST, Manifest, ManifestError
from pipeline.mirror import SyncState, fetch, local_files, local_sha256, node_lock, pull_files, push_files
from pipeline.rundir import DatasetDir
from pipeline.storage import LocalStorage

#: never sent: the lease has its own object; scratch of a prepare in flight stays on its node
NOT_PUSHED = (DatasetDir.LOCK, DatasetDir.DEDUP_SPILL, DatasetDir.APPEND_STAGING, MANIFEST)


def stage_dataset(ds: DatasetDir, workers: int = 16, log: Callable[[str], None] = print) -> Manifest | None:
    """Make this node's cache hold the store's dataset, verified; its manifest (None: local dataset)."""
    if not ds.remote:
        return None
    store = ds.remote_storage
    with node_lock(ds.root):
        raw = store.read_bytes(MANIFEST) if store.exists(MANIFEST) else None
        if raw is None:
            raise ManifestError(f"{ds.where(MANIFEST)}: no manifest; run `pretrain prepare` for this dataset first")
        manifest = Manifest.from_json(raw, ds.where(MANIFEST))
        state = SyncState(ds.root)
        local = LocalStorage(ds.root)
        if local.exists(MANIFEST) and local.read_bytes(MANIFEST) == raw and all(
                state.known_sha(n) == sha for n, sha in manifest.files.items()):
            return manifest
        local.delete(MANIFEST)  # first: a staging cut short leaves no manifest behind
        todo = [(name, sha, None) for name, sha in manifest.files.items() if local_sha256(state, name) != sha]
        sizes = store.infos()
        todo = [(n, sha, sizes[n].size if n in sizes else None) for n, sha, _ in todo]
        fetched = fetch(store, state, todo, workers=workers)
        local.write_atomic(MANIFEST, raw, fsync=True)
        state.save()
    if todo:
        log(f"storage: staged {len(todo)} of {len(manifest.files)} dataset files ({fetched / 1e6:,.1f} MB) from "
            f"{ds.remote} into {ds.root}")
    return manifest


def pull_prepared(ds: DatasetDir) -> None:
    """Before `prepare` on a dataset on the store: the store's files (a finished dataset to skip or
    append to, the stage records of an interrupted one) into this node's mirror."""
    if not ds.remote:
        return
    store = ds.remote_storage
    with node_lock(ds.root):
        state = SyncState(ds.root)
        infos = {k: i for k, i in store.infos().items() if k != DatasetDir.LOCK and not k.startswith(
            (DatasetDir.DEDUP_SPILL, DatasetDir.APPEND_STAGING))}
        pull_files(store, state, infos)
        state.save()


def push_dataset(ds: DatasetDir, workers: int = 16, log: Callable[[str], None] = print) -> None:
    """After `prepare`: every changed file of the mirror to the store, the manifest last."""
    if not ds.remote:
        return
    store = ds.remote_storage
    with node_lock(ds.root):
        state = SyncState(ds.root)
        keys = [k for k in local_files(ds.root) if not any(k == p or k.startswith(p + "/") for p in NOT_PUSHED)]
        sent = push_files(store, state, keys)
        if LocalStorage(ds.root).exists(MANIFEST):
            sent += push_files(store, state, [MANIFEST])
        state.save()
    if sent:
        log(f"storage: uploaded {len(sent)} files of the dataset to {ds.remote}")
