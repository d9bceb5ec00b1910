"""Bookkeeping for `pretrain prepare`'s stages: fingerprints, completion records, context, report.

A stage is done when ``.stages/<name>.json`` (a `StageRecord`) holds the fingerprint of everything
its output depends on and the sha256 of each file it wrote. The record is written (atomically) only
after the stage's files, so an interrupted run continues from the last completed stage, and a
changed config field re-runs only the stages whose fingerprint it enters (fingerprints chain:
dedup → tokenizer → shards). Each stage is a function of one `StageContext`, whose `Scope` says which
input files the run prepares.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

import pipeline
from pipeline.config import DataConfig
from pipeline.data import interrupt, remote_sources
from pipeline.data.clean import FILTERS
from pipeline.data.dedup import Duplicate
from pipeline.data.executors import Executor
from pipeline.data.manifest import Manifest
from pipeline.data.shards import sha256_file
from pipeline.data.sources import Corpus, SourceFile
from pipeline.data.tokenizer import tokenizer_file
from pipeline.errors import CorruptFile
from pipeline.objstore import is_uri
from pipeline.progress import ProgressLine, fraction_line
from pipeline.records import Record
from pipeline.rundir import DatasetDir
from pipeline.storage import LocalStorage, StorageError


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _input_hash(path: str | Path) -> str:
    if is_uri(path):  # an object on a store: its ETag and size, from the listing (remote_sources.py)
        return remote_sources.fingerprint(str(path))
    path = Path(path)
    if path.is_dir():  # a saved HF dataset: every file in it
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return _digest([(p.relative_to(path).as_posix(), sha256_file(p)) for p in files])
    return sha256_file(path)


def input_hashes(files: list[SourceFile]) -> dict[str, str]:
    """sha256 of every input path (a saved HF dataset: of all its files together)."""
    return {path: _input_hash(path) for path in sorted({sf.path for sf in files})}


def fingerprints(cfg: DataConfig, files: list[SourceFile], hashes: dict[str, str] | None = None) -> dict[str, str]:
    """Fingerprint of each stage's output: the earlier stage's, its config fields, the code version.

    The dedup stage's includes the quality filters' names in running order (clean.FILTERS): its
    verdicts file stores indexes into them."""
    sources = [s.model_dump(include={"path", "format", "text_field", "text_unit"}) for s in cfg.sources]
    hashes = input_hashes(files) if hashes is None else hashes
    dedup = cfg.dedup.model_dump(include={"exact", "near"} if not cfg.dedup.near else None)
    kept = _digest("dedup", pipeline.__version__, sources, [(f.label, f.format) for f in files], hashes,
                   cfg.clean.model_dump(), list(FILTERS), dedup)  # which documents are kept, and their cleaned text
    tok = cfg.tokenizer.model_dump(exclude={"fast_encoder"})
    if cfg.tokenizer.path:  # a given tokenizer does not depend on the corpus
        tokenizer = _digest("tokenizer", pipeline.__version__, tok, sha256_file(tokenizer_file(cfg.tokenizer.path)))
    else:
        tokenizer = _digest("tokenizer", pipeline.__version__, tok, kept)
    shards = _digest("shards", pipeline.__version__, kept, tokenizer, [s.resolved_name for s in cfg.sources],
                     cfg.validation_fraction, cfg.shard_max_tokens)
    return {"dedup": kept, "tokenizer": tokenizer, "shards": shards}


class StageRecord(Record):
    """``.stages/<name>.json``: the stage's fingerprint and the sha256 of each file it wrote."""

    fingerprint: str
    files: dict[str, str] = Field(default_factory=dict)
    seconds: float | str = 0.0  # in memory also "reused" or "off"


class DedupRecord(StageRecord):
    """The dedup stage's record: duplicates found per source (in data.sources order)."""

    exact: list[int] = Field(default_factory=list)
    near: list[int] = Field(default_factory=list)
    records: int | None = None  # records the pass read: the later passes' progress total (None: not known)


class EncoderRecord(StageRecord):
    """``.stages/encoder.json``: which encoder a tokenizer gets (fast_tokenizer.choose_encoder) and why,
    checked once per tokenizer: its fingerprint is the tokenizer's sha256 and the code version."""

    encoder: str
    why: str


def encoder_fingerprint(tokenizer_json: str) -> str:
    return _digest("encoder", pipeline.__version__, hashlib.sha256(tokenizer_json.encode()).hexdigest())


def load_stage(out: str | Path, name: str, fingerprint: str, kind: type[StageRecord] = StageRecord
               ) -> StageRecord | None:
    """The completion record of a stage if it matches ``fingerprint`` and its files are intact
    (a missing or unreadable record is a stage to run, never an error)."""
    data = DatasetDir(out)
    store, key = data.storage, data.stage_record(name)
    if not store.exists(key):
        return None
    try:
        record = kind.from_json(store.read_bytes(key), str(store.path(key)))
    except (CorruptFile, StorageError):
        return None
    if record.fingerprint != fingerprint:
        return None
    for file, digest in record.files.items():
        if not store.exists(file) or store.sha256(file) != digest:
            return None
    return record


def save_stage(out: str | Path, name: str, fingerprint: str, files: list[str],
               kind: type[StageRecord] = StageRecord, **info) -> StageRecord:
    """Write the stage's completion record (never once a signal has arrived: what the stage wrote
    after it may be cut short)."""
    interrupt.check()
    data = DatasetDir(out)
    store = data.storage
    record = kind(fingerprint=fingerprint, files={f: store.sha256(f) for f in files}, **info)
    store.write_atomic(data.stage_record(name), record.to_json(indent=1))
    return record


class Scope:
    """Which input files a run prepares, and which of the duplicates found it removes.

    By default: every file of the config, into a dataset of its own. `prepare --append` (append.py)
    passes a scope of its own that prepares only the new files, lets dedup read the dataset's files
    too and settles duplicate groups in their favour, and accepts splits that come out empty."""

    allow_empty_splits = False
    commits = True  # this run's manifest is the dataset's commit point (an append's staging one is not)

    def corpus(self, cfg: DataConfig) -> Corpus:
        """The files to prepare."""
        return Corpus(cfg)

    def dedup_corpus(self, cfg: DataConfig, corpus: Corpus) -> Corpus:
        """The files the dedup pass reads: those prepared, and any they are compared with."""
        return corpus

    def settle(self, duplicates: list[Duplicate], corpus: Corpus) -> list[Duplicate]:
        """The duplicates to remove, of those found among the files of ``corpus`` (the dedup corpus)."""
        return duplicates


@dataclass
class StageContext:
    """What every stage of one `prepare` run works with; prepare builds it once.

    ``removed`` (sorted doc ids of the duplicates) and the executor's shared copies of it and of the
    dedup pass's filter verdicts are set by `share_verdicts` once the dedup stage has run."""

    corpus: Corpus
    executor: Executor
    data: DatasetDir
    fingerprints: dict[str, str]
    log: Callable[[str], None]
    scope: Scope = field(default_factory=Scope)
    force: bool = False
    removed: np.ndarray | None = None
    removed_ref: Any = None
    filtered_ref: Any = None
    records: int | None = None  # records of ``corpus``, once a dedup pass over exactly it has counted them
    kept: int | None = None  # of those, the ones neither a duplicate nor filtered out

    @property
    def cfg(self) -> DataConfig:
        return self.corpus.cfg

    @property
    def store(self) -> LocalStorage:
        return self.data.storage

    def share_verdicts(self, removed: np.ndarray, filtered: np.ndarray | None) -> None:
        self.removed = removed
        self.removed_ref = self.executor.share(removed)
        self.filtered_ref = self.executor.share(filtered) if filtered is not None else None

    def run(self, name: str, work: Callable[[StageContext], StageRecord], files: tuple[str, ...] = (),
            kind: type[StageRecord] = StageRecord) -> StageRecord:
        """The stage's completion record: reused when its fingerprint matches and it has ``files``,
        else ``work(self)``, which writes the record."""
        interrupt.at(f"the {name} stage")
        record = None if self.force else load_stage(self.data.root, name, self.fingerprints[name], kind)
        if record and all(f in record.files for f in files):
            self.log(f"{name}: reused (its inputs and config are unchanged)")
            return record.model_copy(update={"seconds": "reused"})
        return work(self)


class Progress:
    """A stage's progress line while it streams (pipeline/progress.py): refreshed in place on a
    terminal, a plain line every ``every_s`` seconds otherwise; with % and ETA when ``total`` (the
    documents the stage will see) is known. ``done()`` ends it (on a terminal: the final line)."""

    def __init__(self, stage: str, log, every_s: float = 5.0, total: int | None = None, line=None):
        self.stage, self.log, self.total = stage, log, total
        self.line = line or ProgressLine(log, every_s=every_s, tty=None if log is print else False)
        self.t0 = time.time()
        self.documents = self.tokens = 0

    def text(self) -> str:
        seconds = time.time() - self.t0
        msg = fraction_line(self.stage, self.documents, self.total, "documents", seconds)
        if self.tokens:
            msg += f", {self.tokens:,} tokens ({self.tokens / max(seconds, 1e-9):,.0f}/s)"
        return msg

    def update(self, documents: int = 0, tokens: int = 0) -> None:
        self.documents += documents
        self.tokens += tokens
        self.line.show(self.text())

    def done(self) -> None:
        if self.total:
            self.documents = max(self.documents, self.total)  # a sample cut short of the total is complete
        self.line.done(self.text())

    @property
    def seconds(self) -> float:
        return time.time() - self.t0


def summary_table(manifest: Manifest) -> str:
    """Documents in/out per source, quarantine by reason, duplicates, tokens per split, throughput."""
    head = ("source", "documents", "quarantined", "duplicates", "kept", "train tokens", "validation tokens")
    rows = [(s.name, s.records, s.quarantined, s.duplicates, s.kept, s.tokens.get("train", 0),
             s.tokens.get("validation", 0)) for s in manifest.sources]
    totals = tuple(sum(r[i] for r in rows) for i in range(1, len(head)))
    rows.append(("total", *totals))
    cells = [head] + [tuple(r[0:1]) + tuple(f"{v:,}" for v in r[1:]) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    lines = ["  ".join(str(c[i]).ljust(widths[i]) if i == 0 else str(c[i]).rjust(widths[i]) for i in range(len(head)))
             for c in cells]
    q, d, t = manifest.quarantine, manifest.dedup, manifest.throughput
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(q.by_reason.items())) or "none"
    lines.append(f"quarantined by reason: {reasons}  ({q.file})")
    lines.append(f"duplicates removed: exact {d.exact:,}, near {d.near:,}  ({d.file})")
    stages = ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" if isinstance(v, float) else f"{k} {v}"
                       for k, v in t["stage_seconds"].items())
    lines.append(f"time: {t['seconds']:.1f}s ({stages}); tokenize+shards {t['tokens_per_s']:,.0f} tokens/s "
                 f"with the {manifest.tokenizer.encoder} encoder")
    return "\n".join(lines)
