"""Corpus files on an object store (``data.sources[].path: s3://bucket/prefix``), streamed.

A source URI names one object, or a "directory": every object under the prefix, in key order,
hidden names (a part starting with ``.``) left out, as a local directory is read. Nothing is
downloaded whole: jsonl (plain, .gz, .zst) and text are read through `ObjectStorage.open_read`
(ranged GETs, retried where they stopped), buffered, and decompressed by sources.py as a local file
is; parquet is read by pyarrow from the same seekable stream (the footer first, then the column
chunks it needs). A dataset saved with ``datasets.save_to_disk`` on a store is refused in one line:
copy it to a local directory first.

What the stages record of an input file works from the listing alone, without reading the object:
its size (``input_bytes``, the executor choice) and, as its fingerprint (what a rerun and ``prepare
--append`` compare), ``etag:<ETag>:<size>``; a store whose listing has no ETag is hashed instead
(sha256, one streamed read). The URI itself is what the manifest's ``inputs`` name: it holds no
credentials (those come from the environment only).
"""

from __future__ import annotations

import hashlib
import io
import threading
from typing import BinaryIO

from pipeline.errors import ConfigError
from pipeline.objstore import ObjectInfo, ObjectStorage, split_uri
from pipeline.remote_inputs import objects_at

_BUFFER = 1 << 20  # bytes of a buffered stream (each ranged GET itself is objstore._CHUNK)
_HF_MARKERS = ("dataset_dict.json", "state.json")

#: what the listing said of each object URI, so sizes and fingerprints cost no request of their own
_SEEN: dict[str, ObjectInfo] = {}
_SEEN_LOCK = threading.Lock()


def _store(uri: str) -> tuple[ObjectStorage, str]:
    scheme, bucket, key = split_uri(uri)
    return ObjectStorage(f"{scheme}://{bucket}"), key


def list_objects(uri: str, field: str) -> list[str]:
    """The object URIs of a source, in reading order; a ConfigError naming ``field`` when there is
    none or it is a saved HF dataset."""
    store, key = _store(uri)
    infos = objects_at(uri, field)
    base = "" if key in infos else key.rstrip("/")
    rel = {k: k[len(base):].lstrip("/") if base else k for k in infos}
    if key not in infos and any(r in _HF_MARKERS for r in rel.values()):
        raise ConfigError(f"{field}: {uri} is a dataset saved with datasets.save_to_disk; reading one from object "
                          f"storage is not supported: copy it locally (e.g. `aws s3 sync {uri} DIR`) and point "
                          f"{field} at the copy")
    keep = sorted((k for k in infos if key in infos or not any(p.startswith(".") for p in rel[k].split("/"))),
                  key=lambda k: rel[k])
    if not keep:
        raise ConfigError(f"{field}: {uri} holds no objects (only hidden ones)")
    with _SEEN_LOCK:
        for k in keep:
            _SEEN[store.path(k)] = infos[k]
    return [store.path(k) for k in keep]


def _info(uri: str) -> ObjectInfo:
    with _SEEN_LOCK:
        known = _SEEN.get(uri)
    if known is not None:
        return known
    store, key = _store(uri)
    info = store.infos(key).get(key) or ObjectInfo(key, store.size(key), "")
    with _SEEN_LOCK:
        _SEEN[uri] = info
    return info


def object_size(uri: str) -> int:
    """The object's size in bytes (from the listing when it was listed)."""
    return _info(uri).size


def fingerprint(uri: str) -> str:
    """What stands for the object's content in fingerprints and the manifest's ``inputs``:
    ``etag:<ETag>:<size>`` (no read), or its sha256 where the store lists no ETag."""
    info = _info(uri)
    if info.etag:
        return f"etag:{info.etag}:{info.size}"
    store, key = _store(uri)
    h = hashlib.sha256()
    with store.open_read(key) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def open_object(uri: str) -> BinaryIO:
    """A buffered, seekable stream of the object (ranged GETs, nothing downloaded whole)."""
    store, key = _store(uri)
    return io.BufferedReader(store.open_read(key), _BUFFER)
