"""Continued pretraining on a grown dataset: the sample stream as a sequence of *data eras*.

A run that resumes on a dataset grown by ``pretrain prepare --append`` (new shards appended to
its sources, or new sources; nothing already written changed) starts a new era at the global
position where it resumes. Every position keeps the mapping of the era it belongs to, so:

- positions already trained map to the same samples as before (the history and the per-rank
  sample digests stay valid, a rollback or an elastic resume inside the old era stays exact);
- appending does not re-shuffle what was consumed: each source first visits the *remainder* of
  the pass it was in when the era began (the samples of the interrupted epoch not yet drawn)
  together with its new samples, shuffled into one *fill*; only after that fill does it start
  full epochs over all its samples. A source that gained nothing continues its old order as is.

Samples of a source keep their ids when shards are appended: a source's samples are windows cut
from its token stream, and appending only extends that stream.

Era 0 is the original mapping (``loader.blend`` + ``loader.sample_ids``) with no fill, so a run
that never appended data samples exactly as before. Each era records the global position it
starts at, its sources (names, in manifest order), their sample counts and blend weights; eras
are stored in every checkpoint's ``trainer_state.json``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.data.loader import BLEND_BLOCK, block_counts, blend, epoch_permutation, sample_ids


@dataclass(frozen=True)
class Era:
    start: int  # first global sample position of the era
    manifest_sha256: str
    sources: tuple[str, ...]
    num_samples: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def from_json(cls, d: dict) -> Era:
        return cls(int(d["start"]), str(d["manifest_sha256"]), tuple(d["sources"]),
                   tuple(int(n) for n in d["num_samples"]), tuple(float(w) for w in d["weights"]))

    def to_json(self) -> dict:
        return asdict(self) | {"sources": list(self.sources), "num_samples": list(self.num_samples),
                               "weights": list(self.weights)}


class EraError(ValueError):
    """A new era that would change samples already trained on."""


def check_growth(old: Era, new: Era) -> None:
    """A new era may only add sources or samples; raise EraError naming what shrank or vanished."""
    for name, n in zip(old.sources, old.num_samples):
        if name not in new.sources:
            raise EraError(f"source {name!r} was trained on but is missing from the new dataset")
        m = new.num_samples[new.sources.index(name)]
        if m < n:
            raise EraError(f"source {name!r} shrank from {n} to {m} training samples; "
                           f"only appending data keeps what was trained on")
    if new.start < old.start:
        raise EraError(f"a new era cannot start at position {new.start}, before the current one ({old.start})")


def draw_counts(seed: int, weights: Sequence[float], n_positions: int, era: int) -> np.ndarray:
    """Draws per source among the first ``n_positions`` positions of an era."""
    counts = block_counts(weights)
    full, rest = divmod(int(n_positions), BLEND_BLOCK)
    out = counts * full
    if rest:
        src, _ = _blend(seed, weights, np.arange(full * BLEND_BLOCK, full * BLEND_BLOCK + rest), era)
        out = out + np.bincount(src, minlength=len(counts))
    return out


def _blend(seed: int, weights: Sequence[float], rel: np.ndarray, era: int):
    # era 0 keeps the original layout; later eras draw fresh block layouts
    return blend(seed if era == 0 else _mix(seed, era), weights, rel)


def _mix(seed: int, era: int) -> int:
    return int(np.random.SeedSequence([seed, 0xE7A, era]).generate_state(1, np.uint64)[0] >> 1)


def _era_permutation(seed: int, source: int, era: int, epoch: int, n: int) -> np.ndarray:
    return epoch_permutation(seed, source, epoch, n) if era == 0 else epoch_permutation(_mix(seed, era), source, epoch, n)


class EraStream:
    """(source, sample id) for every global position of a run whose data grew over eras.

    Source indices returned are positions in ``names`` (the current dataset's sources)."""

    def __init__(self, eras: Sequence[Era], seed: int, names: Sequence[str]):
        if not eras or eras[0].start != 0:
            raise EraError("the first data era must start at position 0")
        for a, b in zip(eras, eras[1:]):
            check_growth(a, b)
        missing = [n for n in eras[-1].sources if n not in names]
        if missing:
            raise EraError(f"sources {missing} of the newest era are not in the dataset")
        self.eras, self.seed, self.names = list(eras), seed, list(names)
        self.starts = np.array([e.start for e in self.eras], dtype=np.int64)
        self._fills: dict[tuple[int, int], np.ndarray] = {}

    # -- one source within one era ------------------------------------------------------------

    def fill(self, k: int, s: int) -> np.ndarray:
        """Era k's fill for its source s: the remainder of the pass it was in, plus its new samples."""
        key = (k, s)
        if key not in self._fills:
            self._fills[key] = self._make_fill(k, s)
        return self._fills[key]

    def _make_fill(self, k: int, s: int) -> np.ndarray:
        era = self.eras[k]
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        prev = self.eras[k - 1]
        name = era.sources[s]
        if name not in prev.sources:  # a new source: all its samples, shuffled
            rest, before = np.zeros(0, dtype=np.int64), 0
        else:
            ps = prev.sources.index(name)
            drawn = int(draw_counts(self.seed, prev.weights, era.start - prev.start, k - 1)[ps])
            rest, before = self._remainder(k - 1, ps, drawn), prev.num_samples[ps]
        new = np.arange(before, era.num_samples[s], dtype=np.int64)
        if new.size == 0:
            return rest  # nothing appended here: the old order goes on untouched
        both = np.concatenate([rest, new])
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, s, k, 0xF111])))
        return both[rng.permutation(both.size)]

    def _remainder(self, k: int, s: int, drawn: int) -> np.ndarray:
        """What is left of the pass source s of era k was in after ``drawn`` draws."""
        fill, n = self.fill(k, s), self.eras[k].num_samples[s]
        if drawn < fill.size:
            return fill[drawn:]
        epoch, offset = divmod(drawn - fill.size, n)
        return self.epoch(k, s, epoch)[offset:].astype(np.int64)

    def _carried(self, k: int, s: int) -> tuple[int, int] | None:
        """(source index in era k-1, epochs to skip there) when source s did not grow in era k:
        its epochs after the fill are then the old era's next epochs, so its order goes on as is."""
        if k == 0:
            return None
        era, prev = self.eras[k], self.eras[k - 1]
        name = era.sources[s]
        if name not in prev.sources:
            return None
        ps = prev.sources.index(name)
        if prev.num_samples[ps] != era.num_samples[s]:
            return None
        drawn = int(draw_counts(self.seed, prev.weights, era.start - prev.start, k - 1)[ps])
        fill = self.fill(k - 1, ps)
        skip = 0 if drawn < fill.size else (drawn - fill.size) // prev.num_samples[ps] + 1
        return ps, skip

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a stream lives as long as its run)
    def epoch(self, k: int, s: int, j: int) -> np.ndarray:
        """The j-th full epoch (after the fill) of source s in era k."""
        carried = self._carried(k, s)
        if carried is not None:
            return self.epoch(k - 1, carried[0], j + carried[1])
        return _era_permutation(self.seed, s, k, j, self.eras[k].num_samples[s])

    def _sample_ids(self, k: int, s: int, draws: np.ndarray) -> np.ndarray:
        n = self.eras[k].num_samples[s]
        if k == 0:
            return sample_ids(self.seed, s, n, draws)
        fill = self.fill(k, s)
        out = np.empty(draws.size, dtype=np.int64)
        in_fill = draws < fill.size
        out[in_fill] = fill[draws[in_fill]]
        epochs, offsets = np.divmod(draws[~in_fill] - fill.size, n)
        rest = np.empty(epochs.size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            rest[sel] = self.epoch(k, s, int(e))[offsets[sel]]
        out[~in_fill] = rest
        return out

    # -- the whole stream ---------------------------------------------------------------------

    def ids(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions, dtype=np.int64)
        src = np.empty(positions.size, dtype=np.int64)
        sid = np.empty(positions.size, dtype=np.int64)
        which = np.searchsorted(self.starts, positions, side="right") - 1
        for k in np.unique(which):
            era, sel = self.eras[int(k)], which == k
            es, draw = _blend(self.seed, era.weights, positions[sel] - era.start, int(k))
            esid = np.empty(es.size, dtype=np.int64)
            for s in np.unique(es):
                m = es == s
                esid[m] = self._sample_ids(int(k), int(s), draw[m])
            src[sel] = np.array([self.names.index(n) for n in era.sources], dtype=np.int64)[es]
            sid[sel] = esid
        return src, sid
