"""Inputs given as object-store URIs that are used as local files: ``data.tokenizer.path`` (one
object) and ``model.init_from`` (a transformers directory: config.json, weights, tokenizer files).

`local_copy` brings the object, or every object under the prefix, into this node's cache
(``CACHE/inputs/<scheme>/<bucket>/<key>``, see `pipeline.objstore.cache_root`) and returns the local
path. One process per node downloads (a file lock); the node's other processes, and later runs,
find the copy there and reuse it while the store's ETag and the local file's size still match what
was recorded (nothing is re-read). Every copy is checked against the size the store lists.

`read_object` reads one small object whole without caching it (``config.json`` of an init_from
directory at config load time, before the cache directory is known).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.mirror import SyncState, node_lock, pull_files
from pipeline.objstore import ObjectInfo, ObjectStorage, ObjectStoreError, cache_root, split_uri

INPUTS = "inputs"  # under the node cache, beside the "runs" and "data" mirrors


def _bucket_and_key(uri: str) -> tuple[ObjectStorage, str]:
    scheme, bucket, key = split_uri(uri)
    return ObjectStorage(f"{scheme}://{bucket}"), key


def cache_dir_of(uri: str) -> Path:
    """Where ``uri``'s copy lives on this node (it may not be there yet)."""
    scheme, bucket, key = split_uri(uri)
    return cache_root() / INPUTS / scheme / bucket / key


def objects_at(uri: str, field: str) -> dict[str, ObjectInfo]:
    """The object ``uri`` names ({key: info}), or every object under it as a prefix; one LIST. A
    ConfigError naming ``field`` when there is none; an ObjectStoreError (one line) when the store
    cannot be asked (no bucket, no credentials, unreachable)."""
    store, key = _bucket_and_key(uri)
    try:
        infos = store.infos(key)
    except ObjectStoreError as exc:
        raise ObjectStoreError(f"{field}: {exc}") from None
    if key in infos:
        return {key: infos[key]}
    under = {k: i for k, i in infos.items() if not key or k.startswith(key.rstrip("/") + "/")}
    if not under:
        raise ConfigError(f"{field}: no object or prefix {uri} on the store; check the URI (and that it "
                          f"was uploaded)")
    return under


def local_copy(uri: str, field: str) -> Path:
    """This node's verified copy of the object or prefix ``uri`` (downloaded when missing or changed)."""
    store, key = _bucket_and_key(uri)
    infos = objects_at(uri, field)
    target = cache_dir_of(uri)
    root = cache_root() / INPUTS / store.scheme / store.bucket
    with node_lock(root):
        state = SyncState(root)
        try:
            fetched = pull_files(store, state, infos)
        except ObjectStoreError as exc:
            raise ObjectStoreError(f"{field}: {exc}") from None
        state.save()
    for k, info in infos.items():
        size = (root / k).stat().st_size if (root / k).is_file() else None
        if size != info.size:
            raise ObjectStoreError(f"{field}: {store.path(k)}: the cached copy has {size} bytes, the store "
                                   f"lists {info.size}; delete {root / k} and run again")
    if fetched:
        print(f"storage: downloaded {len(fetched)} object(s) of {uri} ({sum(infos[k].size for k in fetched) / 1e6:,.1f}"
              f" MB) into {target}", flush=True)
    return target


def read_object(uri: str, field: str) -> bytes | None:
    """The bytes of one object, None when it does not exist (an ObjectStoreError line when the
    store cannot be asked)."""
    store, key = _bucket_and_key(uri)
    try:
        if not store.exists(key):
            return None
        return store.read_bytes(key)
    except ObjectStoreError as exc:
        raise ObjectStoreError(f"{field}: {exc}") from None
