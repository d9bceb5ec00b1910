"""Raw corpus readers: jsonl (plain, .gz, .zst), parquet, plain text, saved HF datasets.

Each reader yields every record with its position, good or bad: bad records carry a reason and go
to quarantine, so nothing is dropped without a trace. A compressed file that is cut short or
corrupt keeps the records read before the damage and ends with one ``unreadable_file`` record
naming the byte where reading stopped (a cut zstd frame included: zstandard's own stream reader
takes it for a clean end). Lines end in LF, CRLF or a lone CR (old Mac files).

A record's position is a line (jsonl), a row (parquet, hf; 0-based like pyarrow and `datasets`), a
paragraph (text split on blank lines; 1-based) or the whole file (position 0). `doc_id` packs
(source, file, position) into one int64 whose order is the corpus order, so "the first occurrence"
is simply the smallest id. A `Corpus` is the files of every source of a config, with the names of
its records' places (for quarantine and duplicates).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, DataConfig, SourceConfig
from pipeline.data import remote_sources
from pipeline.objstore import is_uri

FORMATS = ("jsonl", "parquet", "text", "hf")
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
COMPRESSED = {".gz", ".zst"}
CORRUPT = "unreadable_file: corrupt"  # how the reason of a compressed file that fails its check starts

# doc_id bit layout: source (12 bits) | file within the source (19) | position in the file (32)
_FILE_BITS, _POS_BITS = 19, 32
MAX_SOURCES, MAX_FILES, MAX_POSITION = 1 << 12, 1 << _FILE_BITS, (1 << _POS_BITS) - 1


@dataclass(frozen=True)
class Record:
    source: int  # index of the source in data.sources
    line: int  # position in its file: line, row, paragraph, or 0 for a whole-file document
    text: str | None  # None when the record is bad
    reason: str | None = None  # why it is bad: "<code>" or "<code>: <detail>"
    raw: str | None = None  # a bounded excerpt of a bad record, for the quarantine file
    file: int = 0  # index of the file within its source


@dataclass(frozen=True)
class SourceFile:
    """One unit of reading: a file (or a split of a saved HF DatasetDict) of one source."""

    source: int
    index: int
    path: str
    format: str
    part: str | None = None  # the split of a DatasetDict

    @property
    def label(self) -> str:
        return f"{self.path}[{self.part}]" if self.part else self.path


def position_unit(fmt: str, text_unit: str = "file") -> str:
    """Name of the position a record of this format carries (the quarantine file's key)."""
    if fmt == "text":
        return text_unit
    return "line" if fmt == "jsonl" else "row"


def doc_ids(source: int, file: int, positions) -> np.ndarray:
    pos = np.asarray(positions, dtype=np.int64)
    return (np.int64(source) << (_FILE_BITS + _POS_BITS)) | (np.int64(file) << _POS_BITS) | pos


def split_doc_ids(ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, file, position) of each packed id."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> (_FILE_BITS + _POS_BITS), (ids >> _POS_BITS) & (MAX_FILES - 1), ids & MAX_POSITION


def split_doc_id(doc_id: int) -> tuple[int, int, int]:
    """(source, file, position) of one packed id."""
    doc_id = int(doc_id)
    return doc_id >> (_FILE_BITS + _POS_BITS), (doc_id >> _POS_BITS) & (MAX_FILES - 1), doc_id & MAX_POSITION


def detect_format(path: str | Path) -> str:
    """Format of a file from its suffix, ignoring a .gz/.zst compression suffix."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in _JSONL_SUFFIXES:
        return "jsonl"
    if last in _PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _hf_parts(path: Path) -> list[str | None] | None:
    """Splits of a saved DatasetDict, [None] for a saved Dataset, None if `path` is neither."""
    if (path / "dataset_dict.json").is_file():
        return sorted(json.loads((path / "dataset_dict.json").read_text())["splits"])
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return [None]
    return None


def list_source_files(src: SourceConfig, source: int) -> list[SourceFile]:
    """Every file of a source in reading order; a ConfigError naming the field if there is none."""
    field = f"data.sources.{source}"
    if is_uri(src.path):  # streamed from an object store (remote_sources.py)
        return _remote_files(src, source, field)
    path = Path(src.path)
    if not path.exists():
        raise ConfigError(f"{field}.path: no such file or directory: {src.path}")
    parts = _hf_parts(path) if path.is_dir() else None
    if src.format == "hf" or (src.format == "auto" and parts is not None):
        if parts is None:
            raise ConfigError(f"{field}.path: {src.path} is not a dataset saved with datasets.save_to_disk")
        files = [SourceFile(source, i, str(path), "hf", part) for i, part in enumerate(parts)]
    elif path.is_dir():
        found = sorted(
            (p for p in path.rglob("*")
             if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not found:
            raise ConfigError(f"{field}.path: directory {src.path} holds no files")
        files = [SourceFile(source, i, str(p), src.format if src.format != "auto" else detect_format(p))
                 for i, p in enumerate(found)]
    else:
        files = [SourceFile(source, 0, str(path), src.format if src.format != "auto" else detect_format(path))]
    if len(files) > MAX_FILES:
        raise ConfigError(f"{field}.path: {len(files)} files; at most {MAX_FILES} per source (split the source)")
    return files


def _remote_files(src: SourceConfig, source: int, field: str) -> list[SourceFile]:
    """The objects of a source on an object store, as SourceFiles (their URIs for paths)."""
    if src.format == "hf":
        raise ConfigError(f"{field}.format: hf (a saved dataset) cannot be read from object storage; copy "
                          f"{src.path} locally and point {field}.path at the copy")
    uris = remote_sources.list_objects(src.path, f"{field}.path")
    if len(uris) > MAX_FILES:
        raise ConfigError(f"{field}.path: {len(uris)} files; at most {MAX_FILES} per source (split the source)")
    return [SourceFile(source, i, u, src.format if src.format != "auto" else detect_format(u))
            for i, u in enumerate(uris)]


def input_bytes(files: list[SourceFile]) -> int:
    """Bytes on disk of every input file (each path once; a saved HF dataset: every file in it)."""
    total = 0
    for name in sorted({f.path for f in files}):
        if is_uri(name):  # the size the store's listing gave
            total += remote_sources.object_size(name)
            continue
        path = Path(name)
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        else:
            total += path.stat().st_size
    return total


class Corpus:
    """The files of every source of a config and how to read and name their records."""

    def __init__(self, cfg: DataConfig, only: set[str] | None = None):
        if not cfg.sources:
            raise ConfigError("data.sources: no sources configured; add at least one path")
        self.cfg = cfg
        # ``only``: the labels of the files to read (`prepare --append` reads the new ones); the
        # others keep their index, so doc ids and quarantine positions name the same places
        self.files = [f for i, s in enumerate(cfg.sources) for f in list_source_files(s, i)
                      if only is None or f.label in only]
        self.by_id = {(f.source, f.index): f for f in self.files}
        self.names = [s.resolved_name for s in cfg.sources]
        self.input_bytes = input_bytes(self.files)

    def items(self) -> list[dict]:
        """One row per file, as Ray's read tasks take them."""
        return [{"source": f.source, "file": f.index, "format": f.format,
                 "path": f.path if is_uri(f.path) else str(Path(f.path).resolve()),
                 "part": f.part or "", "text_field": self.cfg.sources[f.source].text_field,
                 "text_unit": self.cfg.sources[f.source].text_unit} for f in self.files]

    def file_of(self, doc_id: int) -> SourceFile:
        source, file, _ = split_doc_id(doc_id)
        return self.by_id[source, file]

    def where(self, doc_id: int) -> dict:
        """A record's place for the quarantine and duplicates files: its file and position in it."""
        source, _, pos = split_doc_id(doc_id)
        sf = self.file_of(doc_id)
        unit = position_unit(sf.format, self.cfg.sources[source].text_unit)
        return {"file": sf.label, unit: pos} if unit != "file" else {"file": sf.label}

    def source_name(self, doc_id: int) -> str:
        return self.names[split_doc_id(doc_id)[0]]

    def source_path(self, doc_id: int) -> str:
        return self.cfg.sources[split_doc_id(doc_id)[0]].path


def read_file(sf: SourceFile, text_field: str = "text", text_unit: str = "file") -> Iterator[Record]:
    """Every record of one file, good or bad, in file order."""
    if sf.format == "jsonl":
        return read_jsonl(sf.path, sf.source, text_field, sf.index)
    if sf.format == "parquet":
        return read_parquet(sf.path, sf.source, text_field, sf.index)
    if sf.format == "hf":
        return read_hf(sf.path, sf.source, text_field, sf.index, sf.part)
    if sf.format == "text":
        return read_text(sf.path, sf.source, text_unit, sf.index)
    raise ValueError(f"unknown source format {sf.format!r}; expected one of {FORMATS}")


def _excerpt(raw, limit: int = 200) -> str:
    """At most ``limit`` characters of a bad record, always valid UTF-8."""
    if isinstance(raw, bytes):
        raw = raw[: limit * 4].decode("utf-8", errors="backslashreplace")
    elif not isinstance(raw, str):
        raw = repr(raw)
    return raw[:limit].encode("utf-8", errors="backslashreplace").decode("utf-8")


def _document(value, field: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable document, else (None, reason)."""
    if not isinstance(value, str):
        return None, f"not_a_string: {field!r} is {type(value).__name__}"
    text = value.lstrip("\ufeff").replace("\x00", "")  # a BOM; NUL bytes break C tools downstream
    if not text.strip():
        return None, "empty_text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a JSON "\\ud800" escape
        return None, f"invalid_unicode: {exc.reason} at character {exc.start}"
    return text, None


_ZSTD_CHUNK = 1 << 16  # compressed bytes fed to the decompressor at a time


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame; a file that ends inside a frame
    raises EOFError, as gzip does (zstandard's stream reader would report a clean end)."""

    def __init__(self, raw):
        import zstandard

        self._raw, self._dctx = raw, zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the frame being read, None between frames
        self._pending = b""  # compressed bytes after the end of the last frame
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            if not self._decompress_more():
                return 0
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress_more(self) -> bool:
        """Decompress the next chunk; False at a clean end of the file (between two frames)."""
        chunk, self._pending = self._pending or self._raw.read(_ZSTD_CHUNK), b""
        if not chunk:
            if self._frame is not None:
                raise EOFError("a zstd frame is cut short")
            return False
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        self._out = memoryview(self._frame.decompress(chunk))
        if self._frame.eof:  # the frame is complete; what follows it starts the next one
            self._pending, self._frame = self._frame.unused_data, None
        return True


class _Input:
    """An input file opened for reading, decompressed by its suffix (.gz, .zst), that can say
    where a read failed: the byte of the file (compressed) the reader had reached."""

    def __init__(self, path: str | Path):
        self.path = str(path) if is_uri(path) else Path(path)
        self.raw = remote_sources.open_object(self.path) if is_uri(path) else open(self.path, "rb")
        suffix = Path(str(path)).suffix.lower()
        if suffix == ".gz":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif suffix == ".zst":
            self.stream = io.BufferedReader(_ZstdFrames(self.raw), 1 << 16)
        else:
            self.stream = self.raw

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc) -> None:
        self.stopped_at = self.raw.tell()
        try:
            self.stream.close()
        finally:
            self.raw.close()

    def failure(self, exc: BaseException) -> str:
        """The reason of the ``unreadable_file`` record that ends a file read up to ``exc``: ``truncated``
        (the records before the cut are sound), ``corrupt`` (a compressed file whose check failed:
        gzip and zstd check a member or frame only at its end, so the records read may be wrong
        already; prepare refuses the source, see `CORRUPT`), or a read error of a plain file."""
        size = remote_sources.object_size(self.path) if is_uri(self.path) else os.path.getsize(self.path)
        at = self.raw.tell() if not self.raw.closed else getattr(self, "stopped_at", size)
        if isinstance(exc, EOFError):  # the compressed stream stops before its end marker
            return f"unreadable_file: truncated: the file ends at byte {size:,} inside compressed data ({exc})"
        if self.stream is self.raw:
            return f"unreadable_file: read error at byte {at:,} of {size:,}: {exc}"
        return f"{CORRUPT} data at or before byte {at:,} of {size:,}: {exc}"


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt (compressed) file raises while being read."""
    try:
        import zstandard

        return OSError, EOFError, zlib.error, zstandard.ZstdError
    except ImportError:
        return OSError, EOFError, zlib.error


def _lines(f) -> Iterator[bytes]:
    """The lines of a binary stream, each with its ending: LF, CRLF or a lone CR."""
    for raw in f:
        cr = raw.find(b"\r")
        if cr < 0 or (cr == len(raw) - 2 and raw.endswith(b"\r\n")) or cr == len(raw) - 1:
            yield raw
            continue
        start = 0
        while start < len(raw):  # a lone CR ends a line (only the last CR can be part of CRLF)
            cr = raw.find(b"\r", start)
            if cr < 0 or raw[cr + 1:cr + 2] == b"\n":
                yield raw[start:]
                break
            yield raw[start:cr + 1]
            start = cr + 1


def _position(pos: int, path) -> int:
    if pos > MAX_POSITION:
        raise ValueError(f"{path}: more than {MAX_POSITION} records in one file; split the file")
    return pos


def read_jsonl(path: str | Path, source: int, text_field: str, file: int = 0) -> Iterator[Record]:
    """One Record per non-blank line of a jsonl file (plain, .gz or .zst)."""
    line_no, opened = 0, None
    try:
        opened = _Input(path)
        with opened as f:
            for line_no, raw in enumerate(_lines(f), start=1):
                if raw.strip():
                    yield _jsonl_record(raw, source, _position(line_no, path), text_field, file)
    except _read_errors() as exc:  # a truncated or corrupt (compressed) file
        reason = opened.failure(exc) if opened else f"unreadable_file: {exc}"
        yield Record(source, line_no + 1, None, reason, _excerpt(str(path)), file)


def _jsonl_record(raw: bytes, source: int, line_no: int, text_field: str, file: int) -> Record:
    try:
        line = raw.decode("utf-8").lstrip("\ufeff")  # a BOM, usually on line 1
    except UnicodeDecodeError as exc:
        return Record(source, line_no, None, f"invalid_utf8: {exc.reason} at byte {exc.start}", _excerpt(raw), file)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return Record(source, line_no, None, f"malformed_json: {exc.msg}", _excerpt(line), file)
    except RecursionError:
        return Record(source, line_no, None, "malformed_json: nested too deeply", _excerpt(line), file)
    if not isinstance(obj, dict):
        return Record(source, line_no, None, f"not_an_object: got {type(obj).__name__}", _excerpt(line), file)
    if text_field not in obj:
        return Record(source, line_no, None, f"missing_field: {text_field!r}", _excerpt(line), file)
    text, reason = _document(obj[text_field], text_field)
    return Record(source, line_no, text, reason, _excerpt(line) if reason else None, file)


def _column_records(values, start: int, source: int, field: str, file: int) -> Iterator[Record]:
    for row, value in enumerate(values, start=start):
        text, reason = _document(value, field)
        yield Record(source, _position(row, field), text, reason, _excerpt(value) if reason else None, file)


def read_parquet(path: str | Path, source: int, text_field: str, file: int = 0) -> Iterator[Record]:
    """One Record per row of a parquet file; a file without the column is one bad record."""
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(remote_sources.open_object(path) if is_uri(path) else path)
        names = pf.schema_arrow.names
        if text_field not in names:
            yield Record(source, 0, None, f"missing_field: {text_field!r} not in columns {names[:20]} "
                         f"({pf.metadata.num_rows} rows)", _excerpt(str(path)), file)
            return
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            values = batch.column(0).to_pylist()
            yield from _column_records(values, row, source, text_field, file)
            row += len(values)
    except _arrow_errors() as exc:  # a truncated or corrupt file: the rows read so far are kept
        yield Record(source, row, None, f"unreadable_file: at row {row:,}: {exc}", _excerpt(str(path)), file)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    """What pyarrow raises on a truncated or corrupt file (ArrowInvalid is a ValueError, ArrowIOError
    an OSError; a few others only derive from ArrowException)."""
    import pyarrow as pa

    return OSError, ValueError, pa.ArrowException


def read_hf(path: str | Path, source: int, text_field: str, file: int = 0, part: str | None = None) -> Iterator[Record]:
    """One Record per row of a dataset saved with `datasets.save_to_disk` (one split of a DatasetDict)."""
    import datasets

    row = 0
    try:
        ds = datasets.load_from_disk(str(path))
        if part is not None:
            ds = ds[part]
        if text_field not in ds.column_names:
            yield Record(source, 0, None, f"missing_field: {text_field!r} not in columns {ds.column_names[:20]} "
                         f"({ds.num_rows} rows)", _excerpt(str(path)), file)
            return
        for batch in ds.select_columns([text_field]).iter(batch_size=1024):
            values = batch[text_field]
            yield from _column_records(values, row, source, text_field, file)
            row += len(values)
    except _arrow_errors() as exc:  # an arrow file of the dataset is truncated or corrupt
        yield Record(source, row, None, f"unreadable_file: at row {row:,}: {exc}", _excerpt(str(path)), file)


def read_text(path: str | Path, source: int, text_unit: str = "file", file: int = 0) -> Iterator[Record]:
    """A plain-text file as one document, or one per blank-line-separated paragraph (1-based)."""
    number, opened = 0, None
    try:
        opened = _Input(path)
        with opened as f:
            if text_unit == "file":
                yield _text_record(f.read(), source, 0, file)
                return
            paragraph: list[bytes] = []
            for line in _lines(f):
                if line.strip():
                    paragraph.append(line)
                    continue
                if paragraph:
                    number += 1
                    yield _text_record(b"".join(paragraph).rstrip(b"\r\n"), source, _position(number, path), file)
                    paragraph = []
            if paragraph:
                number += 1
                yield _text_record(b"".join(paragraph).rstrip(b"\r\n"), source, _position(number, path), file)
    except _read_errors() as exc:
        reason = opened.failure(exc) if opened else f"unreadable_file: {exc}"
        yield Record(source, number + 1 if text_unit != "file" else 0, None, reason, _excerpt(str(path)), file)


def _text_record(raw: bytes, source: int, position: int, file: int) -> Record:
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Record(source, position, None, f"invalid_utf8: {exc.reason} at byte {exc.start}", _excerpt(raw), file)
    text, reason = _document(value, "text")
    return Record(source, position, text, reason, _excerpt(raw) if reason else None, file)
