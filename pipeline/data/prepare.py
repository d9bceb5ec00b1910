"""`pretrain prepare`: raw corpora → dedup, tokenizer → quarantine and tokenized, verified shards.

Three stages, each skipped when its fingerprint still matches (see stages.py):

    dedup      read → clean → MinHash → duplicates      duplicates.jsonl (only when data.dedup is on)
    tokenizer  train on the kept documents              tokenizer.json (or a copy of data.tokenizer.path)
    shards     read → clean → quarantine / drop duplicates / encode → shards, quarantine.jsonl, manifest.json

An executor (executors.py, ``data.executor``) applies the stage functions of workers.py to blocks of
records: ``local`` in processes forked from the driver, without Ray (the default for inputs up to
``data.local_max_bytes`` when no Ray address is given), or ``ray`` in Ray Data workers (larger inputs,
a cluster). Either way the driver receives the results in corpus order and writes them as they
arrive, so the output is byte-identical whatever the executor, number of workers or blocks, and the
driver's memory does not grow with the corpus. The dedup pass records which documents the quality
filters dropped, so the later passes do not run the filters again. Nothing is lost silently: for
every source, documents in = kept + quarantined + deduplicated, checked before the manifest is written,
and a source lost to quarantine (it keeps nothing, or more than ``data.max_quarantine_share`` of its
records are rejected: a wrong ``text_field``, format or compression, not dirty data) fails the run in
one line naming the source and its top reason. A full disk is one line too (`storage.NoSpace`), after
this run's uncommitted shards are removed so they do not keep the disk full.

Every file is named by `DatasetDir` and written through its storage; a `Scope` (stages.py) says which
input files a run prepares (all of them, or, for `prepare --append`, the new ones: see append.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

import pipeline
from pipeline.config import ConfigError, DataConfig
from pipeline.data import interrupt, workers
from pipeline.data.clean import clean_text
from pipeline.data.dedup import Duplicate
from pipeline.data.executors import (
    Executor, LocalExecutor, RayExecutor, choose_executor, init_ray, ray_running,
)
from pipeline.data.fast_tokenizer import choose_encoder
from pipeline.data.manifest import (
    Accounting, DedupInfo, InputFile, Manifest, ManifestError, QuarantineInfo, ShardSet, SourceInfo, SplitInfo,
    TokenizerInfo, verify_manifest, write_manifest,
)
from pipeline.data.shards import RollingShardWriter, token_dtype
from pipeline.data.sources import COMPRESSED, CORRUPT, Corpus, doc_ids, read_file, split_doc_id, split_doc_ids
from pipeline.data.stages import (
    DedupRecord, EncoderRecord, Progress, Scope, StageContext, StageRecord, encoder_fingerprint, fingerprints,
    input_hashes, load_stage, save_stage, summary_table,
)
from pipeline.data.tokenizer import TokenizerError, load_tokenizer, special_ids, train_tokenizer
from pipeline.errors import UserError
from pipeline.rundir import DatasetDir
from pipeline.storage import LocalStorage, NoSpace, check_space, free_bytes

SPLITS = DatasetDir.SPLITS
QUARANTINE, DUPLICATES, TOKENIZER = DatasetDir.QUARANTINE, DatasetDir.DUPLICATES, DatasetDir.TOKENIZER
FILTERED = DatasetDir.FILTERED  # the dedup pass's filter verdicts: [doc id, clean.FILTERS index]


class PrepareError(UserError):
    """The corpus cannot make a usable dataset (nothing left, or a split would be empty)."""


def _line(record: dict) -> bytes:
    """One line of a .jsonl record file."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


# ---- dedup ------------------------------------------------------------------------------------------

def _dedup(ctx: StageContext) -> DedupRecord:
    """read → clean → MinHash; find duplicates; write duplicates.jsonl and the filter verdicts."""
    corpus, store = ctx.scope.dedup_corpus(ctx.cfg, ctx.corpus), ctx.store
    t0 = time.time()
    ctx.log(f"dedup: reading, cleaning and hashing {len(corpus.files):,} files of {len(corpus.names)} sources")
    store.delete_tree(DatasetDir.DEDUP_SPILL)
    spill = store.local_path(DatasetDir.DEDUP_SPILL)
    try:  # local scratch for the local executor's spilled rows
        found, records, filtered = ctx.executor.duplicates(corpus, spill)
    except OSError as exc:
        check_space(exc, spill)
        raise
    finally:
        store.delete_tree(DatasetDir.DEDUP_SPILL)
    duplicates = ctx.scope.settle(found, corpus)
    exact, near = _write_duplicates(store, corpus, duplicates)
    with store.open_atomic(FILTERED) as f:
        np.save(f, filtered)
    ctx.log(f"dedup: {len(duplicates):,} duplicates ({int(exact.sum()):,} exact, {int(near.sum()):,} near) "
            f"among {records:,} records ({time.time() - t0:.1f}s)")
    return save_stage(ctx.data.root, "dedup", ctx.fingerprints["dedup"], [DUPLICATES, FILTERED], kind=DedupRecord,
                      seconds=time.time() - t0, exact=exact.tolist(), near=near.tolist(),
                      records=records if corpus.files == ctx.corpus.files else None)


def _write_duplicates(store: LocalStorage, corpus: Corpus, duplicates: list[Duplicate]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """duplicates.jsonl, each line naming the duplicate and its first occurrence; (exact, near) per source."""
    exact, near = np.zeros(len(corpus.names), np.int64), np.zeros(len(corpus.names), np.int64)
    with store.open_atomic(DUPLICATES) as f:
        for d in duplicates:
            (exact if d.kind == "exact" else near)[split_doc_id(d.doc_id)[0]] += 1
            first = {"doc_id": d.duplicate_of, "source_name": corpus.source_name(d.duplicate_of),
                     **corpus.where(d.duplicate_of)}
            f.write(_line({"doc_id": d.doc_id, "source_name": corpus.source_name(d.doc_id), **corpus.where(d.doc_id),
                           "kind": d.kind, "similarity": round(d.similarity, 4), "duplicate_of": first}))
    return exact, near


def _removed_ids(store: LocalStorage) -> np.ndarray:
    """Sorted doc ids of the duplicates found by the dedup stage."""
    with store.open_read(DUPLICATES) as f:
        return np.sort(np.array([json.loads(line)["doc_id"] for line in f], dtype=np.int64))


def _dedup_stage(ctx: StageContext) -> DedupRecord:
    """Run (or reuse) dedup when it is on, then share its verdicts with the later passes."""
    if ctx.cfg.dedup.exact or ctx.cfg.dedup.near:
        dedup = ctx.run("dedup", _dedup, files=(DUPLICATES, FILTERED), kind=DedupRecord)
        with ctx.store.open_read(FILTERED) as f:
            filtered = np.load(f)
        ctx.records = dedup.records  # the progress totals of the later passes
    else:
        ctx.store.write_atomic(DUPLICATES, b"")
        n = len(ctx.corpus.names)
        dedup = DedupRecord(fingerprint="", seconds="off", exact=[0] * n, near=[0] * n)
        filtered = None  # no dedup pass: the later passes run the filters themselves
    ctx.share_verdicts(_removed_ids(ctx.store), filtered)
    if ctx.records is not None:
        ctx.kept = ctx.records - len(ctx.removed) - len(filtered)
    return dedup


# ---- tokenizer --------------------------------------------------------------------------------------

def _training_texts(ctx: StageContext, stop: threading.Event) -> Iterator[str]:
    """The kept documents' cleaned text, streamed through the driver, up to data.tokenizer.train_sample_docs
    (or until ``stop`` is set: the run was interrupted)."""
    limit = ctx.cfg.tokenizer.train_sample_docs
    kept = ctx.executor.map(ctx.corpus, workers.kept_texts, clean=ctx.cfg.clean.model_dump(),
                            removed_ref=ctx.removed_ref, filtered_ref=ctx.filtered_ref)
    known = [x for x in (limit, ctx.kept) if x is not None]
    progress = Progress("tokenizer", ctx.log, total=min(known) if known else None)
    n = 0
    try:
        for text in (t for batch in kept for t in batch["text"]):
            if stop.is_set():
                return
            if limit is not None and n >= limit:
                break
            n += 1
            progress.update(1)
            yield str(text)
        progress.done()
    finally:
        getattr(kept, "close", lambda: None)()  # stops the workers when the sample is full


def _tokenizer(ctx: StageContext) -> StageRecord:
    """Train on the kept documents (or copy data.tokenizer.path); write tokenizer.json."""
    tok_cfg = ctx.cfg.tokenizer
    t0 = time.time()
    if tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path)
    else:
        ctx.log("tokenizer: training on the kept documents")
        # in a thread: the trainer iterates the texts on a thread of its own, which would hold a signal
        tokenizer = interrupt.in_thread(lambda stop: train_tokenizer(_training_texts(ctx, stop), tok_cfg),
                                        "tokenizer-training")
    try:
        special_ids(tokenizer, tok_cfg)
    except TokenizerError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    ctx.store.write_atomic(TOKENIZER, tokenizer.to_str(pretty=True))  # the bytes Tokenizer.save writes
    ctx.log(f"tokenizer: {'loaded' if tok_cfg.path else 'trained'} {tok_cfg.type}, vocabulary "
            f"{tokenizer.get_vocab_size():,} ({time.time() - t0:.1f}s)")
    return save_stage(ctx.data.root, "tokenizer", ctx.fingerprints["tokenizer"], [TOKENIZER], seconds=time.time() - t0)


# ---- shards -----------------------------------------------------------------------------------------

def _sample_texts(corpus: Corpus, removed: np.ndarray, per_source_chars: int = 1 << 17) -> list[str]:
    """The first kept documents of each source (about ``per_source_chars`` of text each), read on the
    driver, to check the fast encoder on."""
    sample, removed_set = [], set(removed.tolist())
    for source, src in enumerate(corpus.cfg.sources):
        chars = seen = 0
        for rec in (r for f in corpus.files if f.source == source for r in read_file(f, src.text_field, src.text_unit)):
            seen += 1
            if chars >= per_source_chars or seen > 1000:
                break
            if rec.reason or int(doc_ids(rec.source, rec.file, [rec.line])[0]) in removed_set:
                continue
            text, reason = clean_text(rec.text, corpus.cfg.clean)
            if not reason:
                sample.append(text[: per_source_chars - chars])
                chars += len(sample[-1])
    return sample


def _encoder_choice(ctx: StageContext, tokenizer_json: str) -> tuple[str, str]:
    """(kind, why) of `choose_encoder`, checked once per tokenizer: the verdict is kept in
    ``.stages/encoder.json`` under the tokenizer's sha256, so a run with the same tokenizer neither
    reads the sample nor encodes it twice again."""
    if not ctx.cfg.tokenizer.fast_encoder:
        return choose_encoder(tokenizer_json, [], allow_fast=False)
    fingerprint = encoder_fingerprint(tokenizer_json)
    record = load_stage(ctx.data.root, "encoder", fingerprint, kind=EncoderRecord)
    if record is not None:
        return record.encoder, record.why
    kind, why = choose_encoder(tokenizer_json, _sample_texts(ctx.corpus, ctx.removed))
    save_stage(ctx.data.root, "encoder", fingerprint, [], kind=EncoderRecord, encoder=kind, why=why)
    return kind, why


class _Counts:
    """Per-source tallies of the shards pass: the accounting identity is checked on these."""

    def __init__(self, n: int):
        self.records, self.quarantined, self.duplicates = (np.zeros(n, np.int64) for _ in range(3))
        self.by_reason: Counter = Counter()
        self.source_reasons: list[Counter] = [Counter() for _ in range(n)]  # reason code → records, per source
        self.example: dict[tuple[int, str], str] = {}  # (source, reason code) → its first full reason
        self.corrupt: dict[int, tuple[str, str]] = {}  # source → (file, reason) of its first corrupt file
        self.kept = 0  # over all sources: every k-th one goes to validation


@dataclass
class _Shards:
    """What the shards pass leaves for the manifest."""

    writers: dict[tuple[str, int], RollingShardWriter]
    counts: _Counts
    progress: Progress
    encoder: str
    encoder_note: str
    vocab_size: int
    specials: dict[str, int]
    dtype: np.dtype
    seconds: float = 0.0  # of the pass, from the first batch asked for to the last shard closed


def _shards(ctx: StageContext) -> _Shards:
    """read → clean → drop → encode in workers; the driver writes quarantine.jsonl and appends each
    kept document to its source's shard of its split (every k-th kept document → validation)."""
    cfg, store, names = ctx.cfg, ctx.store, ctx.corpus.names
    tokenizer = Tokenizer.from_str(store.read_text(TOKENIZER))
    specials = special_ids(tokenizer, cfg.tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    kind, why = _encoder_choice(ctx, tokenizer.to_str())
    ctx.log(f"shards: encoding with {kind} ({why})")
    encoded = ctx.executor.map(
        ctx.corpus, workers.encode_batch, clean=cfg.clean.model_dump(), removed_ref=ctx.removed_ref,
        filtered_ref=ctx.filtered_ref, tokenizer_ref=ctx.executor.tokenizer_arg(tokenizer.to_str(), kind), kind=kind,
        eod_id=specials["eod"], dtype=dtype.str, flat=ctx.executor.flat_results)
    for split in SPLITS:  # shards of an earlier, different run
        store.delete_tree(split)
    # shards are memory-mapped by training, so they are local files written in place
    writers = {(split, i): RollingShardWriter(store.local_path(), split, names[i], dtype, cfg.shard_max_tokens)
               for split in SPLITS for i in range(len(names))}
    out = _Shards(writers, _Counts(len(names)), Progress("shards", ctx.log, total=ctx.records), kind, why, tokenizer.get_vocab_size(),
                  specials, dtype)
    every = max(2, round(1 / cfg.validation_fraction))
    try:
        with store.open_atomic(QUARANTINE) as q:
            for batch in encoded:
                _sort_batch(ctx.corpus, batch, out, q, every)
    except BaseException:
        for w in writers.values():
            w.abort()  # the shards are debris now: no index is written for them
        raise
    out.progress.done()
    for w in writers.values():
        w.close()
    out.seconds = out.progress.seconds
    _check_sources(ctx, out)
    if not ctx.scope.allow_empty_splits:
        _check_not_empty(store, out)
    return out


def _sort_batch(corpus: Corpus, b: dict, out: _Shards, q, every: int) -> None:
    """Each record of an encoded batch to quarantine, to the dropped duplicates, or into its source's
    shard of its split (every k-th kept document → validation). The kept documents' tokens go to the
    writers in runs: consecutive documents of one split and source are one write."""
    counts, n = out.counts, len(corpus.names)
    source = split_doc_ids(b["doc_id"])[0]
    counts.records += np.bincount(source, minlength=n)
    counts.duplicates += np.bincount(source[b["duplicate"]], minlength=n)
    bad = [i for i, r in enumerate(b["reason"]) if r]
    for i in bad:
        _quarantine(q, corpus, counts, int(b["doc_id"][i]), str(b["reason"][i]), str(b["raw"][i]))
    kept = np.ones(len(source), dtype=bool)
    kept[bad] = False
    kept &= ~np.asarray(b["duplicate"], dtype=bool)
    tokens, lengths = _flat_tokens(b, kept)
    sources = source[kept]
    validation = (counts.kept + np.arange(len(sources))) % every == every - 1
    group = sources * 2 + validation  # runs of one (source, split)
    ends = np.append(np.flatnonzero(group[1:] != group[:-1]) + 1, len(group))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    start = 0
    for end in ends.tolist():
        if end > start:
            writer = out.writers[SPLITS[int(validation[start])], int(sources[start])]
            writer.add_documents(tokens[offsets[start]:offsets[end]], lengths[start:end])
        start = end
    counts.kept += len(sources)
    out.progress.update(len(source), int(offsets[-1]))


def _flat_tokens(b: dict, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths) of the kept records, end to end: a flat batch as it is (its ``length`` is 0
    for every record not kept), a batch of per-record ``ids`` joined."""
    if "tokens" in b:
        return b["tokens"], np.asarray(b["length"], dtype=np.int64)[kept]
    ids = [b["ids"][i] for i in np.flatnonzero(kept)]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)), lengths


def _quarantine(q, corpus: Corpus, counts: _Counts, doc_id: int, reason: str, raw: str) -> None:
    code, source = reason.split(": ", 1)[0], split_doc_id(doc_id)[0]
    counts.by_reason[code] += 1
    counts.quarantined[source] += 1
    counts.source_reasons[source][code] += 1
    counts.example.setdefault((source, code), reason)
    if reason.startswith(CORRUPT):
        counts.corrupt.setdefault(source, (corpus.file_of(doc_id).label, reason))
    q.write(_line({"source": corpus.source_path(doc_id), **corpus.where(doc_id), "reason": reason, "excerpt": raw}))


_HINTS = {  # reason code → what to check, for a source lost to quarantine
    "missing_field": "check data.sources.{i}.text_field", "not_a_string": "check data.sources.{i}.text_field",
    "malformed_json": "check data.sources.{i}.format and the file's compression suffix",
    "not_an_object": "check data.sources.{i}.format", "invalid_utf8": "check the file's encoding and compression",
    "unreadable_file": "the file is truncated or corrupt: restore it from its origin",
    "empty_text": "check data.sources.{i}.text_field",
}


def _source_problem(ctx: StageContext, out: _Shards, i: int) -> str | None:
    """Why source ``i`` is lost to quarantine (one line), or None."""
    counts, limit, name = out.counts, ctx.cfg.max_quarantine_share, ctx.corpus.names[i]
    records, quarantined = int(counts.records[i]), int(counts.quarantined[i])
    kept = sum(out.writers[split, i].documents for split in SPLITS)
    where = f"source {name!r} (data.sources.{i}: {ctx.cfg.sources[i].path})"
    if records == 0:
        return None if ctx.scope.allow_empty_splits else f"{where} has no records: its files are empty"
    if i in counts.corrupt:
        file, reason = counts.corrupt[i]
        return (f"{where}: {file} is corrupt ({reason.removeprefix(CORRUPT).strip()}); the records read from it "
                f"may already be wrong (a compressed file is checked only at its end): restore the file "
                f"(see {ctx.store.path(QUARANTINE)}; nothing was committed)")
    if not quarantined or (kept and quarantined / records <= limit):
        return None
    code, n = counts.source_reasons[i].most_common(1)[0]
    example = counts.example[i, code]
    example = example if len(example) <= 160 else example[:159] + "…"
    hint = _HINTS.get(code, f"data.clean.{code.removeprefix('filter:')} drops them" if code.startswith("filter:")
                      else "see the excerpts").format(i=i)
    see = f"see {ctx.store.path(QUARANTINE)}; nothing was committed"
    if not kept:
        return (f"{where} kept 0 of its {records:,} records: {quarantined:,} quarantined, most as {code} "
                f"({n:,}): {example}; {hint} ({see})")
    return (f"{where} quarantined {quarantined / records:.1%} of its {records:,} records, over "
            f"data.max_quarantine_share ({limit:g}): most as {code} ({n:,}): {example}; {hint}, or raise "
            f"data.max_quarantine_share ({see})")


def _check_sources(ctx: StageContext, out: _Shards) -> None:
    """Refuse a source lost to quarantine, which training would silently leave out of its blend."""
    problems = [p for i in range(len(ctx.corpus.names)) if (p := _source_problem(ctx, out, i))]
    if problems:
        more = f" (and {len(problems) - 1} more source(s))" if len(problems) > 1 else ""
        raise PrepareError(f"prepare: {problems[0]}{more}")


def _check_not_empty(store: LocalStorage, out: _Shards) -> None:
    counts = out.counts
    if counts.kept == 0:
        raise PrepareError(f"prepare: no usable documents: all {int(counts.records.sum()):,} records were quarantined "
                           f"or duplicates; see {store.path(QUARANTINE)} and {store.path(DUPLICATES)}")
    for split in SPLITS:
        if sum(w.num_tokens for (s, _), w in out.writers.items() if s == split) < 2:
            raise PrepareError(f"prepare: the {split} split is empty ({counts.kept} documents kept); add documents "
                               f"or raise data.validation_fraction; see {store.path(QUARANTINE)}")


# ---- the run ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Started:
    """The executor a run uses, why, and the seconds it took to start."""

    executor: Executor
    why: str
    seconds: float


def _executor(cfg: DataConfig, corpus: Corpus, ray_address: str | None, log) -> _Started:
    """The executor this run uses (see executors.choose_executor), started."""
    name, why = choose_executor(cfg.executor, ray_address=ray_address, env_address=os.environ.get("RAY_ADDRESS"),
                                input_bytes=corpus.input_bytes, local_max_bytes=cfg.local_max_bytes,
                                ray_running=ray_running())
    t0 = time.time()
    if name == "ray":
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data's INFO lines would drown ours
        init_ray(cfg.num_cpus, ray_address)
        ex: Executor = RayExecutor(cfg)
    else:
        ex = LocalExecutor(cfg)
    seconds = time.time() - t0
    log(f"prepare: {name} executor, {ex.describe()} ({why})")
    return _Started(ex, why, seconds)


def _current(data: DatasetDir, fingerprint: str) -> Manifest | None:
    """The dataset's verified manifest when it was prepared with this fingerprint."""
    try:
        manifest = verify_manifest(data.root)
    except ManifestError:
        return None
    return manifest if manifest.fingerprint == fingerprint else None


def prepare(cfg: DataConfig, ray_address: str | None = None, log=print, force: bool = False, *,
            scope: Scope | None = None) -> Manifest:
    """Run the data stages; returns the manifest written to ``output_dir/manifest.json``.

    ``scope``: which input files to prepare (default: all; `prepare --append` passes its own)."""
    t0 = time.time()
    scope = scope or Scope()
    corpus = scope.corpus(cfg)
    data = DatasetDir(cfg.output_dir)
    hashes = input_hashes(corpus.files)
    fps = fingerprints(cfg, corpus.files, hashes)
    current = None if force else _current(data, fps["shards"])
    if current is not None:
        log(f"prepare: {data.root} is up to date (same inputs and config); nothing to do")
        return current
    data.storage.makedirs()
    data.storage.delete(DatasetDir.MANIFEST)  # invalid until this run finishes
    try:
        manifest = _build(cfg, corpus, data, hashes, fps, ray_address, log, scope, force, t0)
    except NoSpace as exc:
        raise _no_space(data, corpus, exc) from None
    log("prepare: done\n" + summary_table(manifest))
    return manifest


def _build(cfg: DataConfig, corpus: Corpus, data: DatasetDir, hashes: dict[str, str], fps: dict[str, str],
           ray_address: str | None, log, scope: Scope, force: bool, t0: float) -> Manifest:
    """The stages, then the manifest (the commit point; never written once a signal has arrived)."""
    started = _executor(cfg, corpus, ray_address, log)
    ctx = StageContext(corpus, started.executor, data, fps, log, scope, force)
    dedup = _dedup_stage(ctx)
    tok = ctx.run("tokenizer", _tokenizer)
    interrupt.at("the shards stage")
    shards = _shards(ctx)
    inputs = [InputFile(source=corpus.names[f.source], file=f.label, sha256=hashes[f.path]) for f in corpus.files]
    manifest = _manifest(ctx, dedup, tok, shards, started, inputs, time.time() - t0)
    files = [TOKENIZER, QUARANTINE, DUPLICATES] + [f for w in shards.writers.values() for f in w.files()]
    interrupt.at("writing the manifest")
    interrupt.check()
    manifest = write_manifest(data.root, manifest, files)
    if scope.commits:
        interrupt.committed()
    return manifest


def expected_bytes(corpus: Corpus) -> int:
    """About what a prepared dataset of ``corpus`` takes on disk: a token per ~4 bytes of text, 2
    bytes a token, a compressed input holding ~4 times its size in text."""
    text = sum(Path(f.path).stat().st_size * (4 if Path(f.path).suffix.lower() in COMPRESSED else 1)
               for f in {f.path: f for f in corpus.files}.values() if Path(f.path).is_file())
    return text // 2


def _no_space(data: DatasetDir, corpus: Corpus, exc: NoSpace) -> NoSpace:
    """The full disk as one line: this run's uncommitted shards and scratch are removed first (they
    would keep the disk full), then what the dataset needs, about, and what is free now."""
    store = data.storage
    written = sum(store.size(k) for k in store.list() if not k.startswith(DatasetDir.STAGES))
    if not store.exists(DatasetDir.MANIFEST):  # nothing committed: the shards on disk are debris
        for prefix in (*SPLITS, DatasetDir.DEDUP_SPILL):
            store.delete_tree(prefix)
    needed = max(written + exc.needed, expected_bytes(corpus))
    return NoSpace(exc.path, needed, free_bytes(exc.path))


# ---- the manifest -----------------------------------------------------------------------------------

def _source_infos(corpus: Corpus, dedup: DedupRecord, shards: _Shards) -> list[SourceInfo]:
    """What each source became; refuses counts that do not add up (documents are never lost silently)."""
    counts, writers, out = shards.counts, shards.writers, []
    for i, s in enumerate(corpus.cfg.sources):
        kept = sum(writers[split, i].documents for split in SPLITS)
        found = dedup.exact[i] + dedup.near[i]
        records, quarantined = int(counts.records[i]), int(counts.quarantined[i])
        if int(counts.duplicates[i]) != found or records != kept + quarantined + found:
            raise RuntimeError(
                f"prepare: documents of source {corpus.names[i]!r} do not add up: {records} in, {kept} kept, "
                f"{quarantined} quarantined, {counts.duplicates[i]} duplicates dropped of {found} found")
        out.append(SourceInfo(
            name=corpus.names[i], path=s.path, format=sorted({f.format for f in corpus.files if f.source == i}),
            files=sum(1 for f in corpus.files if f.source == i), text_field=s.text_field, records=records,
            kept=kept, quarantined=quarantined, duplicates=found, duplicates_exact=dedup.exact[i],
            duplicates_near=dedup.near[i], tokens={split: writers[split, i].num_tokens for split in SPLITS}))
    return out


def _split_info(names: list[str], writers: dict, split: str) -> SplitInfo:
    ws = [writers[split, i] for i in range(len(names))]
    return SplitInfo(documents=sum(w.documents for w in ws), tokens=sum(w.num_tokens for w in ws),
                     sources={names[i]: ShardSet(documents=w.documents, tokens=w.num_tokens, shards=list(w.shards))
                              for i, w in enumerate(ws)})


def _manifest(ctx: StageContext, dedup: DedupRecord, tok: StageRecord, shards: _Shards, started: _Started,
              inputs: list[InputFile], seconds: float) -> Manifest:
    """The manifest of a prepared dataset, without ``files`` (write_manifest hashes them)."""
    cfg, names, counts = ctx.cfg, ctx.corpus.names, shards.counts
    sources = _source_infos(ctx.corpus, dedup, shards)
    ray_start = {"ray_start": round(started.seconds, 3)} if started.executor.name == "ray" else {}
    quarantined = sum(s.quarantined for s in sources)
    return Manifest(
        code_version=pipeline.__version__, fingerprint=ctx.fingerprints["shards"], stage_fingerprints=ctx.fingerprints,
        created_unix=int(time.time()), executor={"name": started.executor.name, "why": started.why},
        dtype=shards.dtype.name,
        tokenizer=TokenizerInfo(file=TOKENIZER, type=cfg.tokenizer.type, vocab_size=shards.vocab_size,
                                eod_token=cfg.tokenizer.eod, special_ids=shards.specials, encoder=shards.encoder,
                                encoder_note=shards.encoder_note),
        splits={split: _split_info(names, shards.writers, split) for split in SPLITS},
        sources=sources,
        inputs=inputs,  # what `prepare --append` compares new listings against
        accounting=Accounting(documents_in=sum(s.records for s in sources), kept=sum(s.kept for s in sources),
                              quarantined=quarantined, deduplicated=sum(s.duplicates for s in sources)),
        quarantine=QuarantineInfo(file=QUARANTINE, records=quarantined,
                                  by_reason=dict(sorted(counts.by_reason.items()))),
        dedup=DedupInfo(file=DUPLICATES, exact=sum(dedup.exact), near=sum(dedup.near), config=cfg.dedup.model_dump()),
        throughput={
            "seconds": round(seconds, 3),
            "stage_seconds": {**ray_start, "dedup": _secs(dedup), "tokenizer": _secs(tok), "shards": _secs(shards)},
            "tokens_per_s": round(shards.progress.tokens / max(shards.seconds, 1e-9)),
        },
        config=cfg.model_dump(mode="json"), files={})


def _secs(stage: StageRecord | _Shards):
    v = stage.seconds
    return round(v, 3) if isinstance(v, float) else v
