"""Exact and near-duplicate removal across all sources, computed on Ray.

Every kept document gets an exact key (blake2b-128 of its normalized text) and, for near dedup, a
MinHash signature of its word n-grams; LSH cuts the signature into bands. Documents that share a
bucket (the exact key, or one band) are candidates. A candidate pair is confirmed when the exact keys
are equal, or (near) when the signatures estimate a Jaccard similarity of at least the threshold.
Union-find joins confirmed pairs into groups; in each group the first document in corpus order (the
smallest doc id: source index, file, position) stays and the others are its duplicates.

On Ray: signatures are computed in ``map_batches`` next to cleaning; a ``groupby(key)`` with a
vectorized Count over all bucket keys (a hash shuffle) finds the buckets with more than one member;
one more ``map_batches`` pass brings only the documents in those buckets to the driver. The driver
holds the duplicates and their originals, never the corpus.

Locally (``find_duplicates_local``, the local executor): the same steps in the driver, with the
per-document rows and bucket keys spilled to files (the keys hash-partitioned, one partition counted
at a time) in place of Ray's object store and shuffle. Both end in ``_group`` on the same rows, so
they find the same duplicates.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DedupConfig

_U64 = np.uint64
_NGRAM_MULT = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD,
     0xC4CEB9FE1A85EC53, 0x27D4EB2F165667C5, 0x94D049BB133111EB], dtype=_U64)
_CHUNK_SHINGLES = 4096  # bounds the (shingles × permutations) matrix of one step to a few MB


@dataclass(frozen=True)
class Duplicate:
    doc_id: int
    duplicate_of: int  # the first occurrence of its group
    kind: str  # "exact" or "near"
    similarity: float  # estimated Jaccard similarity to duplicate_of (1.0 for exact)


def exact_key(text: str) -> np.ndarray:
    """128-bit hash of the normalized text, as two uint64."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    return np.frombuffer(digest, dtype=_U64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the output (uint64 arithmetic wraps)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def shingle_hashes(text: str, ngram_size: int) -> np.ndarray:
    """Distinct 64-bit hashes of the lower-cased word n-grams (the whole text if it is shorter)."""
    words = text.lower().encode("utf-8").split()
    if not words:
        return np.zeros(0, dtype=_U64)
    h = np.fromiter(map(zlib.crc32, words), dtype=_U64, count=len(words))
    n = min(ngram_size, len(h))
    mult = np.resize(_NGRAM_MULT, n) + _U64(2) * np.arange(n, dtype=_U64)  # distinct odd multipliers
    windows = np.lib.stride_tricks.sliding_window_view(h, n)  # (shingles, n)
    return np.unique(_mix64((windows * mult).sum(axis=1, dtype=_U64) + _U64(n)))


class MinHasher:
    """num_perm hash functions h(x) = (a·x + b) mod 2^64 >> 32 with random odd a (multiply-shift)."""

    def __init__(self, num_perm: int, seed: int):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**64, num_perm, dtype=_U64, endpoint=False) | _U64(1)
        self.b = rng.integers(0, 2**64, num_perm, dtype=_U64, endpoint=False)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        sig = np.full(len(self.a), 0xFFFFFFFF, dtype=_U64)
        for start in range(0, len(shingles), _CHUNK_SHINGLES):
            x = shingles[start : start + _CHUNK_SHINGLES, None] * self.a + self.b  # (chunk, num_perm)
            np.minimum(sig, (x >> _U64(32)).min(axis=0), out=sig)
        return sig.astype(np.uint32)


@functools.lru_cache(maxsize=16)  # a few ms, and bucket_keys asks for every block
def lsh_params(threshold: float, num_perm: int, bands: int | None = None) -> tuple[int, int]:
    """(bands, rows per band). With bands None: the split minimizing the area of false positives
    below the threshold plus four times the false negatives above it (candidates are checked
    afterwards, so a false positive costs only time while a false negative keeps a duplicate)."""
    if bands is not None:
        return bands, num_perm // bands
    s = np.linspace(0.0, 1.0, 2001)
    below, above = s < threshold, s >= threshold
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        r = num_perm // b
        p = 1.0 - (1.0 - s**r) ** b  # probability that two documents of similarity s share a band
        err = _area(p[below], s[below]) + 4.0 * _area(1.0 - p[above], s[above])
        if err < best_err - 1e-12:
            best, best_err = (b, r), err
    return best


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (np.trapezoid is numpy 2 only)."""
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2) if len(x) > 1 else 0.0


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) 64-bit bucket keys; the band index is mixed in, so bands never collide."""
    n = sigs.shape[0]
    x = sigs[:, : bands * rows].reshape(n, bands, rows).astype(_U64)
    mult = np.resize(_NGRAM_MULT, rows) + _U64(2) * np.arange(rows, dtype=_U64)
    h = (x * mult).sum(axis=2, dtype=_U64) + np.arange(1, bands + 1, dtype=_U64) * _U64(0x632BE59BD9B4E019)
    return _mix64(h)


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity: the share of equal MinHash values."""
    return float(np.mean(sig_a == sig_b))


def candidate_pairs(keys: np.ndarray, members: np.ndarray, all_pairs_up_to: int = 32) -> np.ndarray:
    """(k, 2) distinct index pairs (i < j) of members sharing a key. A bucket of up to
    ``all_pairs_up_to`` members gives every pair; a larger one pairs each member with the first
    and with the next (enough to connect it; its members are near-copies of each other anyway)."""
    order = np.lexsort((members, keys))
    keys, members = keys[order], members[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    pairs = []
    for s, e in zip(starts, ends):
        group = np.unique(members[s:e])
        if len(group) < 2:
            continue
        if len(group) <= all_pairs_up_to:
            i, j = np.triu_indices(len(group), k=1)
            pairs.append(np.stack([group[i], group[j]], axis=1))
        else:
            pairs.append(np.stack([np.full(len(group) - 1, group[0]), group[1:]], axis=1))
            pairs.append(np.stack([group[1:-1], group[2:]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def resolve(ids: np.ndarray, exact: np.ndarray, sigs: np.ndarray | None, pairs: np.ndarray,
            threshold: float) -> list[Duplicate]:
    """Confirm candidate pairs (indices into ids/exact/sigs) and group them with union-find; every
    member of a group except its smallest id is a Duplicate of that id."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        same = bool((exact[i] == exact[j]).all())
        if same or (sigs is not None and similarity(sigs[i], sigs[j]) >= threshold):
            ri, rj = root(i), root(j)
            if ri != rj:  # the smaller id becomes the root: it is the first occurrence
                lo, hi = (ri, rj) if ids[ri] < ids[rj] else (rj, ri)
                parent[hi] = lo
    out = []
    for i in range(len(ids)):
        r = root(i)
        if r == i:
            continue
        if (exact[i] == exact[r]).all():
            out.append(Duplicate(int(ids[i]), int(ids[r]), "exact", 1.0))
        else:
            out.append(Duplicate(int(ids[i]), int(ids[r]), "near", similarity(sigs[i], sigs[r])))
    return sorted(out, key=lambda d: d.doc_id)


def bucket_keys(exact: np.ndarray, sigs: np.ndarray | None, cfg: DedupConfig) -> np.ndarray:
    """(documents, 1 + bands) int64 bucket keys: the exact key's first half, then the LSH bands."""
    cols = [exact[:, :1]] if cfg.exact else []
    if cfg.near and sigs is not None:
        cols.append(band_keys(sigs, *lsh_params(cfg.threshold, cfg.num_perm, cfg.bands)))
    return np.concatenate(cols, axis=1).view(np.int64)


# ---- Ray: the distributed part ------------------------------------------------------------------

def _bucket_rows(batch: dict, dedup: dict) -> dict:
    cfg = DedupConfig(**dedup)
    good = batch["reason"] == ""
    sigs = batch["sig"][good] if cfg.near else None
    keys = bucket_keys(batch["exact"][good], sigs, cfg)
    return {"key": keys.reshape(-1), "one": np.ones(keys.size, dtype=np.int8)}


def _shared_keys(batch: dict) -> dict:
    return {"key": batch["key"][batch["count()"] > 1]}


def _colliding_docs(batch: dict, dedup: dict, colliding_ref) -> dict:
    cfg = DedupConfig(**dedup)
    colliding = colliding_ref
    if type(colliding_ref).__name__ == "ObjectRef":
        import ray

        colliding = ray.get(colliding_ref)
    good = batch["reason"] == ""
    exact, ids = batch["exact"][good], batch["doc_id"][good]
    sigs = batch["sig"][good] if cfg.near else None
    keys = bucket_keys(exact, sigs, cfg)
    hit = np.isin(keys, colliding)
    rows = hit.any(axis=1)
    out = {"doc_id": ids[rows], "exact": exact[rows], "keys": np.where(hit, keys, 0)[rows]}
    if cfg.near:
        out["sig"] = sigs[rows]
    return out


def find_duplicates(meta, cfg: DedupConfig, num_partitions: int) -> list[Duplicate]:
    """Duplicates among the good rows of ``meta`` (a materialized Ray Dataset with columns doc_id,
    reason, exact and, for near dedup, sig), sorted by doc id."""
    import ray
    from ray.data.aggregate import Count

    if not (cfg.exact or cfg.near):
        return []
    dedup = cfg.model_dump()
    buckets = meta.map_batches(_bucket_rows, fn_kwargs={"dedup": dedup}, batch_format="numpy", batch_size=None)
    counts = buckets.groupby("key", num_partitions=num_partitions).aggregate(Count())
    shared = counts.map_batches(_shared_keys, batch_format="numpy", batch_size=None)  # filtered in the workers
    colliding = [b["key"] for b in shared.iter_batches(batch_size=65536, batch_format="numpy")]
    colliding = np.unique(np.concatenate(colliding)) if colliding else np.zeros(0, np.int64)
    if not len(colliding):
        return []
    docs = meta.map_batches(
        _colliding_docs, fn_kwargs={"dedup": dedup, "colliding_ref": ray.put(colliding)},
        batch_format="numpy", batch_size=None,
    )
    return _group(list(docs.iter_batches(batch_size=65536, batch_format="numpy")), cfg)


def _group(parts: list[dict], cfg: DedupConfig) -> list[Duplicate]:
    """The duplicates among the documents of colliding buckets (batches of ``_colliding_docs`` rows)."""
    if not parts:
        return []
    ids = np.concatenate([p["doc_id"] for p in parts])
    exact = np.concatenate([p["exact"] for p in parts])
    keys = np.concatenate([p["keys"] for p in parts])
    sigs = np.concatenate([p["sig"] for p in parts]) if cfg.near else None
    order = np.argsort(ids, kind="stable")  # canonical order, whatever the blocks were
    ids, exact, keys = ids[order], exact[order], keys[order]
    sigs = sigs[order] if sigs is not None else None
    member = np.repeat(np.arange(len(ids)), keys.shape[1])
    flat = keys.reshape(-1)
    pairs = candidate_pairs(flat[flat != 0], member[flat != 0])
    return resolve(ids, exact, sigs, pairs, cfg.threshold)


# ---- local: the same computation in one process, spilling to disk ------------------------------

def find_duplicates_local(meta_batches, cfg: DedupConfig, spill_dir: Path, partitions: int = 16) -> list[Duplicate]:
    """Duplicates among the good rows of ``meta_batches`` (an iterable of ``scan_batch`` outputs, as
    the local executor yields them), with the same result as ``find_duplicates``.

    The same steps as on Ray, with files in ``spill_dir`` instead of the object store, so memory does
    not grow with the corpus: each batch's good rows (ids, exact keys, signatures) are appended to
    files, and its bucket keys to one of ``partitions`` files chosen by the key's top bits; counting
    each partition's keys (one at a time) gives the colliding keys; one pass over the spilled rows
    picks out the documents in colliding buckets, which are grouped exactly as on Ray."""
    if not (cfg.exact or cfg.near):
        collections.deque(meta_batches, maxlen=0)  # run the scan anyway: it records the filter verdicts
        return []
    dedup = cfg.model_dump()
    spill_dir.mkdir(parents=True, exist_ok=True)
    names = ["doc_id", "exact", "sig"] if cfg.near else ["doc_id", "exact"]
    rows = {name: open(spill_dir / f"{name}.bin", "wb") for name in names}
    parts = [open(spill_dir / f"keys-{p:03d}.bin", "wb") for p in range(partitions)]
    shift = np.uint64(64 - max(1, int(np.ceil(np.log2(partitions)))))
    try:
        for batch in meta_batches:
            good = batch["reason"] == ""
            good_rows = {name: np.ascontiguousarray(batch[name][good]) for name in names}
            for name in names:
                good_rows[name].tofile(rows[name])
            keys = bucket_keys(good_rows["exact"], good_rows.get("sig"), cfg).reshape(-1)
            part = (keys.view(_U64) >> shift) % _U64(partitions)
            for p in np.unique(part).tolist():
                keys[part == p].tofile(parts[p])
    finally:
        for f in [*rows.values(), *parts]:
            f.close()
    colliding = []
    for p in range(partitions):
        keys, counts = np.unique(np.fromfile(spill_dir / f"keys-{p:03d}.bin", dtype=np.int64), return_counts=True)
        colliding.append(keys[counts > 1])
    colliding = np.unique(np.concatenate(colliding))
    if not len(colliding):
        return []
    n = (spill_dir / "doc_id.bin").stat().st_size // 8
    found = []
    for start in range(0, n, 65536):  # the spilled rows, a chunk at a time
        count = min(65536, n - start)
        chunk = {"doc_id": np.fromfile(spill_dir / "doc_id.bin", np.int64, count, offset=start * 8),
                 "exact": np.fromfile(spill_dir / "exact.bin", _U64, count * 2, offset=start * 16).reshape(-1, 2)}
        if cfg.near:
            chunk["sig"] = np.fromfile(spill_dir / "sig.bin", np.uint32, count * cfg.num_perm,
                                       offset=start * 4 * cfg.num_perm).reshape(-1, cfg.num_perm)
        chunk["reason"] = np.full(count, "", dtype=object)
        found.append(_colliding_docs(chunk, dedup, colliding))
    return _group(found, cfg)
