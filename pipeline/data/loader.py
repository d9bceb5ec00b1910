"""Deterministic, resumable, blended sampling over a prepared split.

Everything a rank reads is a pure function of (seed, global sample position):

- ``rank_positions``: which global positions a rank reads for a micro-step, from ``consumed_samples``;
- ``blend``: which source a position draws from (exact proportions per block of positions) and the
  how-many-th draw from that source it is;
- ``epoch_permutation``: which sample of that source the draw is, shuffled anew each epoch.

So a run resumed on another number of ranks with the same global batch continues exactly where it
stopped, and MLM masking, seeded by (seed, sample id), needs no state either.

Samples are cut from a source's token stream (its shards in order, documents joined by their
end-of-document token). GPT: windows of ``seq_len + 1`` tokens, inputs and labels shifted by one.
BERT: ``[CLS] + seq_len - 2 tokens + [SEP]``, then 80/10/10 masking. With ``data.document_masking``
a batch also says which document each token is in (``Batch.doc_ids``), and BERT rows are packed
from whole segments instead (packing.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.data.manifest import Manifest
from pipeline.data.masking import mask_tokens
from pipeline.data.packing import (document_bodies, documents_of, fill_row, gpt_window, pack_rows, row_layout,
                                   shard_document_starts)
from pipeline.data.shards import IndexedShard, ShardError
from pipeline.rundir import DatasetDir

BLEND_BLOCK = 4096  # positions per block; each block holds the exact blend proportions


@functools.lru_cache(maxsize=16)
def epoch_permutation(seed: int, source: int, epoch: int, num_samples: int) -> np.ndarray:
    """The visiting order of one source's samples in one epoch."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, source, epoch])))
    perm = rng.permutation(num_samples)
    perm.setflags(write=False)
    return perm


def block_counts(weights: Sequence[float], block: int = BLEND_BLOCK) -> np.ndarray:
    """Draws per source in one block: proportional to the weights, largest remainders rounded up."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    short = block - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


@functools.lru_cache(maxsize=8)
def _block_layout(seed: int, weights: tuple[float, ...], block: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """For block b: the source of each position and its rank among that source's draws in the block."""
    counts = block_counts(weights, block)
    sources = np.repeat(np.arange(len(counts)), counts)
    if len(counts) > 1:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x51E5D, b])))
        rng.shuffle(sources)
    ranks = np.empty(block, dtype=np.int64)
    for s in range(len(counts)):
        sel = sources == s
        ranks[sel] = np.arange(int(sel.sum()))
    sources.setflags(write=False)
    ranks.setflags(write=False)
    return sources, ranks


def blend(seed: int, weights: Sequence[float], positions: np.ndarray, block: int = BLEND_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(source index, draw number within that source) for each global position."""
    positions = np.asarray(positions, dtype=np.int64)
    counts = block_counts(weights, block)
    src = np.empty(positions.size, dtype=np.int64)
    draw = np.empty(positions.size, dtype=np.int64)
    blocks, offsets = np.divmod(positions, block)
    for b in np.unique(blocks):
        sel = blocks == b
        layout_src, layout_rank = _block_layout(seed, tuple(float(x) for x in weights), block, int(b))
        s = layout_src[offsets[sel]]
        src[sel] = s
        draw[sel] = int(b) * counts[s] + layout_rank[offsets[sel]]
    return src, draw


def sample_ids(seed: int, source: int, num_samples: int, draws: np.ndarray) -> np.ndarray:
    """Sample ids for the given draw numbers of one source (endless, reshuffled every epoch)."""
    draws = np.asarray(draws, dtype=np.int64)
    epochs, offsets = np.divmod(draws, num_samples)
    out = np.empty(draws.size, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = epoch_permutation(seed, source, int(epoch), num_samples)[offsets[sel]]
    return out


def rank_positions(consumed_samples: int, micro_step: int, rank: int, world_size: int, micro_batch: int) -> np.ndarray:
    """Global positions one rank reads for one micro-step.

    A step covers positions [consumed, consumed + global_batch); micro-step m of that step gives
    rank r the slice that starts at consumed + (m·world + r)·micro.
    """
    start = consumed_samples + (micro_step * world_size + rank) * micro_batch
    return np.arange(start, start + micro_batch, dtype=np.int64)


class Batch(tuple):
    """``(input_ids, labels)``, each (B, T), unpacked as always; with document masking ``doc_ids``
    (B, T) rides along for the model's ``doc_ids=`` (None otherwise)."""

    doc_ids: torch.Tensor | None

    def __new__(cls, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None):
        batch = super().__new__(cls, (input_ids, labels))
        batch.doc_ids = doc_ids
        return batch

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in self), None if self.doc_ids is None else self.doc_ids.to(device))

    @staticmethod
    def cat(batches: Sequence[Batch]) -> Batch:
        docs = [b.doc_ids for b in batches]
        return Batch(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
                     None if docs[0] is None else torch.cat(docs))


class TokenStream:
    """The shards of one source read as one contiguous token stream."""

    def __init__(self, prefixes: Sequence[str | Path]):
        self.shards = [IndexedShard(p) for p in prefixes]
        sizes = [s.num_tokens for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            pos = start + filled
            k = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[k])
            take = min(length - filled, self.shards[k].num_tokens - local)
            out[filled : filled + take] = self.shards[k].tokens[local : local + take]
            filled += take
        return out

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at the given stream positions."""
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        out = np.empty(positions.size, dtype=np.int64)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self.shards[k].tokens[positions[sel] - self.offsets[k]]
        return out

    def document_starts(self) -> np.ndarray:
        """Stream positions where each document starts, from the shards' indexes."""
        parts = [shard_document_starts(s) + off for s, off in zip(self.shards, self.offsets[:-1])]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class GPTSamples:
    """Causal-LM samples from one source: (input_ids, labels), shifted by one token.

    ``document_masking``: the same windows, with ``doc_ids`` and no label across a document end."""

    def __init__(self, prefixes: Sequence[str | Path] | str | Path, seq_len: int, *, document_masking: bool = False):
        if isinstance(prefixes, (str, Path)):
            prefixes = [prefixes]
        self.stream = TokenStream(prefixes)
        self.seq_len = seq_len
        self.doc_starts = self.stream.document_starts() if document_masking else None
        self.num_samples = (self.stream.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise ShardError(
                f"{prefixes[0]}: {self.stream.num_tokens} tokens cannot fill one sample of {seq_len + 1}; "
                f"lower train.seq_len or prepare more data"
            )

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, ids) -> Batch:
        """(input_ids, labels), each (B, T)."""
        L = self.seq_len
        if self.doc_starts is not None:
            return self._document_batch(ids)
        tokens = torch.from_numpy(np.stack([self.stream.read(int(i) * L, L + 1) for i in ids]))  # (B, T+1)
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def _document_batch(self, ids) -> Batch:
        L, rows = self.seq_len, []
        for i in ids:
            start = int(i) * L
            docs = documents_of(self.doc_starts, np.arange(start, start + L + 1))  # (T+1,)
            rows.append(gpt_window(self.stream.read(start, L + 1), docs))
        return Batch(*(torch.from_numpy(np.stack(part)) for part in zip(*rows)))  # (B, T) each


class BERTSamples:
    """Masked-LM samples from one source: ``[CLS] text [SEP]``, masked by (seed, sample id).

    ``document_masking``: rows packed from whole segments, ``[CLS] piece [SEP] …`` (packing.py)."""

    def __init__(self, prefixes: Sequence[str | Path] | str | Path, seq_len: int, *, seed: int,
                 special: dict[str, int], vocab_size: int, mask_prob: float = 0.15, document_masking: bool = False):
        if isinstance(prefixes, (str, Path)):
            prefixes = [prefixes]
        self.stream = TokenStream(prefixes)
        self.seq_len, self.seed, self.mask_prob = seq_len, seed, mask_prob
        self.cls, self.sep, self.mask = special["cls"], special["sep"], special["mask"]
        self.pad = special.get("pad", self.sep)
        self.special_ids = sorted(set(special.values()))
        self.vocab_size = vocab_size
        self.bodies = self.rows = None
        if document_masking:
            self._pack(special.get("eod"))
        else:
            self.num_samples = self.stream.num_tokens // (seq_len - 2)
        if self.num_samples < 1:
            raise ShardError(f"{prefixes[0]}: too few tokens for one sample of {seq_len}; prepare more data")

    def __len__(self) -> int:
        return self.num_samples

    def _pack(self, eod: int | None) -> None:
        """The row table of document-masked rows (a scan over the documents, once)."""
        n = self.stream.num_tokens
        starts = self.stream.document_starts()
        ends = np.append(starts[1:], n)
        last = self.stream.at(np.clip(ends - 1, 0, max(n - 1, 0))) if n else np.zeros(0, dtype=np.int64)
        self.bodies = document_bodies(starts, n, last, eod)
        self.rows = pack_rows(self.bodies, self.seq_len)
        self.num_samples = len(self.rows)

    def row(self, sample_id: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens, doc_ids) of one row before masking; doc_ids None without document masking."""
        if self.rows is None:
            body = self.stream.read(int(sample_id) * (self.seq_len - 2), self.seq_len - 2)
            return np.concatenate([[self.cls], body, [self.sep]]).astype(np.int64), None
        d, pos = (int(v) for v in self.rows[int(sample_id)])
        pieces, *_ = fill_row(self.bodies, d, pos, self.seq_len)
        bodies = [self.stream.read(a, b - a) for a, b in pieces]
        return row_layout(bodies, self.seq_len, cls=self.cls, sep=self.sep, pad=self.pad)

    def tokens(self, sample_id: int) -> np.ndarray:
        return self.row(sample_id)[0]

    def batch(self, ids) -> Batch:
        """(input_ids, labels), each (B, T); labels are -100 except at masked positions."""
        inputs, labels, docs = [], [], []
        for i in ids:
            tokens, doc_ids = self.row(i)
            x, y = mask_tokens(
                tokens, seed=self.seed, sample_index=int(i), vocab_size=self.vocab_size,
                mask_id=self.mask, special_ids=self.special_ids, mask_prob=self.mask_prob,
            )
            inputs.append(x)
            labels.append(y)
            docs.append(doc_ids)
        packed = None if self.rows is None else torch.from_numpy(np.stack(docs))
        return Batch(torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels)), packed)


def open_split(data_dir: str | Path, manifest: Manifest | dict, split: str, seq_len: int, *, arch: str = "gpt",
               seed: int = 0, document_masking: bool = False) -> dict[str, GPTSamples | BERTSamples]:
    """Source name → samples of one split, in manifest order (sources without enough data are left out).

    ``manifest``: the dataset's verified Manifest (or its JSON dict, from a script that read the file);
    ``document_masking``: data.document_masking (batches carry doc_ids)."""
    data = DatasetDir(data_dir)
    m = Manifest.coerce(manifest, str(data.manifest))
    tok, out = m.tokenizer, {}
    for name, src in m.splits[split].sources.items():
        prefixes = [data.storage.local_path(p) for p in src.shards]  # memory-mapped: local files
        if not prefixes or src.tokens < seq_len + 1:
            continue
        if arch == "bert":
            out[name] = BERTSamples(prefixes, seq_len, seed=seed, special=tok.special_ids, vocab_size=tok.vocab_size,
                                    document_masking=document_masking)
        else:
            out[name] = GPTSamples(prefixes, seq_len, document_masking=document_masking)
    if not out:
        raise ShardError(f"{data.root}: no source of the {split} split has {seq_len + 1} tokens; lower train.seq_len")
    return out


class BlendedSamples:
    """Several sources drawn in proportion to their weights, as one endless sample stream."""

    def __init__(self, sources: dict[str, GPTSamples | BERTSamples], weights: dict[str, float], seed: int):
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.weights = [float(weights.get(n, 1.0)) for n in self.names]
        self.seed = seed
        self.eras = None  # an eras.EraStream once the dataset grew during the run (see eras.py)

    def ids(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample id) for each global position."""
        if self.eras is not None:
            return self.eras.ids(positions)
        src, draw = blend(self.seed, self.weights, positions)
        sid = np.empty_like(draw)
        for s in np.unique(src):
            sel = src == s
            sid[sel] = sample_ids(self.seed, int(s), len(self.sources[s]), draw[sel])
        return src, sid

    def batch(self, src: np.ndarray, sid: np.ndarray) -> Batch:
        return Batch.cat([self.sources[s].batch([i]) for s, i in zip(src.tolist(), sid.tolist())])
