"""Megatron-compatible indexed datasets: a ``.bin`` of raw token ids and an ``.idx`` (MMIDIDX).

The ``.idx`` layout, all little-endian, is what Megatron-LM, NeMo and GPT-NeoX readers expect:

    9 bytes  magic  b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code (see DTYPE_CODES)
    u64      sequence count S
    u64      document-index count D (documents + 1)
    i32[S]   sequence lengths, in tokens
    i64[S]   sequence pointers, byte offsets into the .bin
    i64[D]   document indices: the sequence index where each document starts, then S

We write one sequence per document (its tokens plus the end-of-document token), so the ``.bin``
is the whole token stream in document order and samples can be cut from it with plain slicing.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.rundir import DatasetDir
from pipeline.storage import check_space

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


class ShardError(UserError):
    """A shard that is missing, truncated or not in the expected format."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32 (Megatron has no uint32 code)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


class ShardWriter:
    """Streams documents into ``prefix.bin`` and writes ``prefix.idx`` on close (a full disk is a
    `NoSpace` naming the file)."""

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self._bin_path = Path(f"{self.prefix}.bin")
        try:
            self._bin = open(self._bin_path, "wb")
        except OSError as exc:
            check_space(exc, self._bin_path)
            raise
        self._lengths: list[int] = []
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        try:
            self._bin.write(arr.tobytes(order="C"))
        except OSError as exc:
            check_space(exc, self._bin_path, (self.num_tokens + arr.size) * self.dtype.itemsize)
            raise
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents that lie end to end in ``tokens`` (``lengths[i]`` tokens each): one write."""
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        try:
            self._bin.write(memoryview(arr).cast("B"))
        except OSError as exc:
            check_space(exc, self._bin_path, (self.num_tokens + arr.size) * self.dtype.itemsize)
            raise
        self._lengths.extend(np.asarray(lengths, dtype=np.int64).tolist())
        self.num_tokens += int(arr.size)

    def close(self) -> None:
        path = self._bin_path
        try:
            self._bin.close()
            path = Path(f"{self.prefix}.idx")
            write_index(path, np.array(self._lengths, dtype=np.int32), self.dtype)
        except OSError as exc:
            check_space(exc, path, self.num_tokens * self.dtype.itemsize + 12 * len(self._lengths))
            raise

    def abort(self) -> None:
        """Stop writing after a failure: the ``.bin`` is closed as it is, no ``.idx`` is written
        (the shard is debris that no manifest lists)."""
        try:
            self._bin.close()
        except OSError:
            pass

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RollingShardWriter:
    """Documents of one source and split, cut into shards of about ``max_tokens`` tokens each.

    Shards are named ``<split>/<source>-00000``, ``-00001``, … (`DatasetDir.shard_prefix`); a document
    never spans two shards. They are written in place under ``root`` (a local directory: the
    dataset's manifest, written last, is what makes them part of a dataset).
    """

    def __init__(self, root: Path, split: str, source: str, dtype: np.dtype, max_tokens: int):
        self.root, self.split, self.source = Path(root), split, source
        self.dtype, self.max_tokens = np.dtype(dtype), max_tokens
        self.shards: list[str] = []  # prefixes relative to root
        self.documents = self.num_tokens = 0
        self._current: ShardWriter | None = None

    def add_document(self, tokens) -> None:
        if self._current is None or self._current.num_tokens >= self.max_tokens:
            self._roll()
        self._current.add_document(tokens)
        self.documents += 1
        self.num_tokens += len(tokens)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents end to end in ``tokens``, cut into shards exactly as `add_document` one at a time
        would: a new shard before the document that finds the current one at ``max_tokens`` or more."""
        lengths = np.asarray(lengths, dtype=np.int64)
        start = at = 0
        while start < len(lengths):
            if self._current is None or self._current.num_tokens >= self.max_tokens:
                self._roll()
            # the documents that still start below max_tokens go into the current shard
            before = self._current.num_tokens + np.concatenate([[0], np.cumsum(lengths[start:-1])])
            n = max(1, int(np.searchsorted(before, self.max_tokens, side="left")))
            size = int(lengths[start:start + n].sum())
            self._current.add_documents(tokens[at:at + size], lengths[start:start + n])
            self.documents += n
            self.num_tokens += size
            start, at = start + n, at + size

    def _roll(self) -> None:
        if self._current is not None:
            self._current.close()
        rel = DatasetDir.shard_prefix(self.split, self.source, len(self.shards))
        try:
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            check_space(exc, (self.root / rel).parent)
            raise
        self._current = ShardWriter(self.root / rel, self.dtype)
        self.shards.append(rel)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def files(self) -> list[str]:
        return [f"{p}.{ext}" for p in self.shards for ext in ("bin", "idx")]


def write_index(path: Path, lengths: np.ndarray, dtype: np.dtype) -> None:
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * np.dtype(dtype).itemsize
    doc_index = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", _CODE_OF[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_index)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_index.tobytes())


class IndexedShard:
    """Read-only, memory-mapped view of one ``prefix.bin``/``prefix.idx`` pair."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx_path, bin_path = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise ShardError(f"shard file missing: {p}")
        raw = idx_path.read_bytes()
        header = len(MAGIC) + 8 + 1 + 8 + 8
        if len(raw) < header or raw[: len(MAGIC)] != MAGIC:
            raise ShardError(f"{idx_path}: not an MMIDIDX index (bad magic or truncated header)")
        (version,) = struct.unpack_from("<Q", raw, len(MAGIC))
        code, seq_count, doc_count = struct.unpack_from("<BQQ", raw, len(MAGIC) + 8)
        if version != VERSION or code not in DTYPE_CODES:
            raise ShardError(f"{idx_path}: unsupported version {version} or dtype code {code}")
        expected = header + seq_count * 4 + seq_count * 8 + doc_count * 8
        if len(raw) != expected:
            raise ShardError(f"{idx_path}: {len(raw)} bytes, expected {expected} (truncated or padded)")
        self.dtype = DTYPE_CODES[code]
        off = header
        self.sequence_lengths = np.frombuffer(raw, np.int32, seq_count, off)
        off += seq_count * 4
        self.sequence_pointers = np.frombuffer(raw, np.int64, seq_count, off)
        off += seq_count * 8
        self.document_indices = np.frombuffer(raw, np.int64, doc_count, off)
        n_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = bin_path.stat().st_size
        if bin_size != n_tokens * self.dtype.itemsize:
            raise ShardError(
                f"{bin_path}: {bin_size} bytes, but the index describes {n_tokens} tokens "
                f"({n_tokens * self.dtype.itemsize} bytes)"
            )
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sequence_lengths[i])])


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()
