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
every source, documents in = kept + quarantined + deduplicated, checked before the manifest is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

import pipeline
from pipeline.config import ConfigError, DataConfig
from pipeline.data import workers
from pipeline.data.clean import clean_text
from pipeline.data.dedup import Duplicate
from pipeline.data.executors import (
    LocalExecutor, RayExecutor, choose_executor, init_ray, input_bytes, ray_running,
)
from pipeline.data.fast_tokenizer import choose_encoder
from pipeline.data.manifest import MANIFEST, ManifestError, verify_manifest, write_manifest
from pipeline.data.shards import RollingShardWriter, token_dtype
from pipeline.data.sources import (
    SourceFile, doc_ids, list_source_files, position_unit, read_file, split_doc_id, split_doc_ids,
)
from pipeline.data.stages import Progress, fingerprints, input_hashes, load_stage, save_stage, summary_table
from pipeline.data.tokenizer import TokenizerError, load_tokenizer, special_ids, train_tokenizer
from pipeline.errors import UserError

SPLITS = ("train", "validation")
QUARANTINE, DUPLICATES, TOKENIZER = "quarantine.jsonl", "duplicates.jsonl", "tokenizer.json"
FILTERED = ".stages/dedup-filtered.npy"  # the dedup pass's filter verdicts: [doc id, clean.FILTERS index]


class PrepareError(UserError):
    """The corpus cannot make a usable dataset (nothing left, or a split would be empty)."""


class _Corpus:
    """The files of every source and how to read and name their records."""

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
        return [{"source": f.source, "file": f.index, "path": str(Path(f.path).resolve()), "format": f.format,
                 "part": f.part or "", "text_field": self.cfg.sources[f.source].text_field,
                 "text_unit": self.cfg.sources[f.source].text_unit} for f in self.files]

    def where(self, doc_id: int) -> dict:
        """A record's place for the quarantine and duplicates files: its file and position in it."""
        source, file, pos = split_doc_id(doc_id)
        sf: SourceFile = self.by_id[source, file]
        unit = position_unit(sf.format, self.cfg.sources[source].text_unit)
        return {"file": sf.label, unit: pos} if unit != "file" else {"file": sf.label}

    def source_name(self, doc_id: int) -> str:
        return self.names[split_doc_id(doc_id)[0]]

    def source_path(self, doc_id: int) -> str:
        return self.cfg.sources[split_doc_id(doc_id)[0]].path


def _dedup(corpus: _Corpus, ex, out: Path, fingerprint: str, log, prior: set[str] | None = None) -> dict:
    """read → clean → MinHash; find duplicates; write duplicates.jsonl and the filter verdicts.

    ``prior``: labels of files already in the dataset (`prepare --append`): they are read for
    dedup only, their documents always win, and only duplicates among the others are written."""
    cfg, n = corpus.cfg, len(corpus.names)
    t0 = time.time()
    log(f"dedup: reading, cleaning and hashing {len(corpus.files):,} files of {n} sources")
    duplicates, records, filtered = ex.duplicates(corpus, out / ".dedup-spill")
    if prior:
        duplicates = prefer_prior(duplicates, lambda i: corpus.by_id[split_doc_id(i)[:2]].label in prior)
    exact, near = np.zeros(n, np.int64), np.zeros(n, np.int64)
    with open(out / (DUPLICATES + ".tmp"), "w", encoding="utf-8") as f:
        for d in duplicates:
            (exact if d.kind == "exact" else near)[split_doc_id(d.doc_id)[0]] += 1
            first = {"doc_id": d.duplicate_of, "source_name": corpus.source_name(d.duplicate_of),
                     **corpus.where(d.duplicate_of)}
            f.write(json.dumps({"doc_id": d.doc_id, "source_name": corpus.source_name(d.doc_id),
                                **corpus.where(d.doc_id), "kind": d.kind, "similarity": round(d.similarity, 4),
                                "duplicate_of": first}, ensure_ascii=False) + "\n")
    os.replace(out / (DUPLICATES + ".tmp"), out / DUPLICATES)
    (out / FILTERED).parent.mkdir(parents=True, exist_ok=True)
    with open(out / (FILTERED + ".tmp"), "wb") as f:
        np.save(f, filtered)
    os.replace(out / (FILTERED + ".tmp"), out / FILTERED)
    log(f"dedup: {len(duplicates):,} duplicates ({int(exact.sum()):,} exact, {int(near.sum()):,} near) "
        f"among {records:,} records ({time.time() - t0:.1f}s)")
    return save_stage(out, "dedup", fingerprint, [DUPLICATES, FILTERED], seconds=time.time() - t0,
                      exact=exact.tolist(), near=near.tolist())


def prefer_prior(duplicates: list[Duplicate], is_prior) -> list[Duplicate]:
    """Re-anchor duplicate groups on documents already in the dataset: a group with a prior document
    keeps that one (the smallest id of them) and removes every new member, whatever the ids' order;
    prior documents themselves are left out (their fate was decided when they were prepared)."""
    groups: dict[int, list[Duplicate]] = {}
    for d in duplicates:
        groups.setdefault(d.duplicate_of, []).append(d)
    out = []
    for root, members in groups.items():
        priors = sorted(i for i in [root, *(m.doc_id for m in members)] if is_prior(i))
        if not priors:
            out.extend(members)
            continue
        anchor = priors[0]
        out.extend(Duplicate(m.doc_id, anchor, m.kind, m.similarity) for m in members if not is_prior(m.doc_id))
        if not is_prior(root):  # the group's first occurrence is new: it duplicates the prior one too
            a = next(m for m in members if m.doc_id == anchor)
            out.append(Duplicate(root, anchor, a.kind, a.similarity))
    return sorted(out, key=lambda d: d.doc_id)


def _removed_ids(out: Path) -> np.ndarray:
    """Sorted doc ids of the duplicates found by the dedup stage."""
    with open(out / DUPLICATES, encoding="utf-8") as f:
        return np.sort(np.array([json.loads(line)["doc_id"] for line in f], dtype=np.int64))


def _tokenizer(corpus: _Corpus, ex, out: Path, fingerprint: str, removed_ref, filtered_ref, log) -> dict:
    """Train on the kept documents streamed through the driver (or copy data.tokenizer.path)."""
    tok_cfg = corpus.cfg.tokenizer
    t0 = time.time()
    if tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path)
    else:
        log("tokenizer: training on the kept documents")
        kept = ex.map(corpus, workers.kept_texts, clean=corpus.cfg.clean.model_dump(), removed_ref=removed_ref,
                      filtered_ref=filtered_ref)
        progress = Progress("tokenizer", log)

        def texts():
            n = 0
            try:
                for batch in kept:
                    for text in batch["text"]:
                        if tok_cfg.train_sample_docs is not None and n >= tok_cfg.train_sample_docs:
                            return
                        n += 1
                        progress.update(1)
                        yield str(text)
            finally:
                getattr(kept, "close", lambda: None)()  # stops the workers when the sample is full

        tokenizer = train_tokenizer(texts(), tok_cfg)
    try:
        special_ids(tokenizer, tok_cfg)
    except TokenizerError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    tokenizer.save(str(out / TOKENIZER))
    log(f"tokenizer: {'loaded' if tok_cfg.path else 'trained'} {tok_cfg.type}, vocabulary "
        f"{tokenizer.get_vocab_size():,} ({time.time() - t0:.1f}s)")
    return save_stage(out, "tokenizer", fingerprint, [TOKENIZER], seconds=time.time() - t0)


def _sample_texts(corpus: _Corpus, removed: np.ndarray, per_source_chars: int = 1 << 17) -> list[str]:
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


class _Counts:
    """Per-source tallies of the shards pass: the accounting identity is checked on these."""

    def __init__(self, n: int):
        self.records, self.quarantined, self.duplicates = (np.zeros(n, np.int64) for _ in range(3))
        self.by_reason: Counter = Counter()


def _shards(corpus: _Corpus, ex, out: Path, removed: np.ndarray, removed_ref, filtered_ref, log,
            allow_empty: bool = False) -> tuple[dict, _Counts, dict]:
    """read → clean → drop → encode in workers; the driver writes quarantine.jsonl and appends each
    kept document to its source's shard of its split (every k-th kept document → validation)."""
    cfg, names = corpus.cfg, corpus.names
    tokenizer = load_tokenizer(out / TOKENIZER)
    specials = special_ids(tokenizer, cfg.tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    kind, why = choose_encoder(tokenizer.to_str(), _sample_texts(corpus, removed), cfg.tokenizer.fast_encoder)
    log(f"shards: encoding with {kind} ({why})")
    encoded = ex.map(corpus, workers.encode_batch, clean=cfg.clean.model_dump(), removed_ref=removed_ref,
                     filtered_ref=filtered_ref, tokenizer_ref=ex.tokenizer_arg(tokenizer.to_str(), kind), kind=kind,
                     eod_id=specials["eod"], dtype=dtype.str)
    for split in SPLITS:  # shards of an earlier, different run
        shutil.rmtree(out / split, ignore_errors=True)
    every = max(2, round(1 / cfg.validation_fraction))
    writers = {(split, i): RollingShardWriter(out, split, names[i], dtype, cfg.shard_max_tokens)
               for split in SPLITS for i in range(len(names))}
    counts, n = _Counts(len(names)), 0
    progress = Progress("shards", log)
    try:
        with open(out / (QUARANTINE + ".tmp"), "w", encoding="utf-8") as q:
            for b in encoded:
                source = split_doc_ids(b["doc_id"])[0]
                counts.records += np.bincount(source, minlength=len(names))
                counts.duplicates += np.bincount(source[b["duplicate"]], minlength=len(names))
                tokens = 0
                for i in range(len(source)):
                    if b["reason"][i]:
                        _quarantine(q, corpus, counts, int(b["doc_id"][i]), str(b["reason"][i]), str(b["raw"][i]))
                    elif not b["duplicate"][i]:  # kept: every k-th one goes to validation
                        writers[SPLITS[n % every == every - 1], int(source[i])].add_document(b["ids"][i])
                        n += 1
                        tokens += len(b["ids"][i])
                progress.update(len(source), tokens)
        os.replace(out / (QUARANTINE + ".tmp"), out / QUARANTINE)
    finally:
        for w in writers.values():
            w.close()
    if n == 0 and not allow_empty:
        raise PrepareError(f"prepare: no usable documents: all {int(counts.records.sum()):,} records were quarantined "
                           f"or duplicates; see {out / QUARANTINE} and {out / DUPLICATES}")
    for split in SPLITS:
        if sum(writers[split, i].num_tokens for i in range(len(names))) < 2 and not allow_empty:
            raise PrepareError(f"prepare: the {split} split is empty ({n} documents kept); add documents or "
                               f"raise data.validation_fraction; see {out / QUARANTINE}")
    info = {"seconds": progress.seconds, "tokens": progress.tokens, "encoder": kind, "encoder_note": why,
            "vocab_size": tokenizer.get_vocab_size(), "specials": specials, "dtype": dtype.name}
    return writers, counts, info


def _quarantine(q, corpus: _Corpus, counts: _Counts, doc_id: int, reason: str, raw: str) -> None:
    counts.by_reason[reason.split(": ", 1)[0]] += 1
    counts.quarantined[split_doc_id(doc_id)[0]] += 1
    q.write(json.dumps({"source": corpus.source_path(doc_id), **corpus.where(doc_id), "reason": reason,
                        "excerpt": raw}, ensure_ascii=False) + "\n")


def _is_current(out: Path, fingerprint: str) -> bool:
    try:
        return verify_manifest(out).get("fingerprint") == fingerprint
    except ManifestError:
        return False


def _stage(out: Path, name: str, fingerprint: str, force: bool, run, log, files: tuple[str, ...] = ()) -> dict:
    """The stage's completion record: reused when its fingerprint matches and it has ``files``, else run it."""
    record = None if force else load_stage(out, name, fingerprint)
    if record and all(f in record.get("files", {}) for f in files):
        log(f"{name}: reused (its inputs and config are unchanged)")
        return {**record, "seconds": "reused"}
    return run()


def _executor(cfg: DataConfig, corpus: _Corpus, ray_address: str | None, log):
    """The executor this run uses (see executors.choose_executor), started, and its start seconds."""
    name, why = choose_executor(cfg.executor, ray_address=ray_address, env_address=os.environ.get("RAY_ADDRESS"),
                                input_bytes=corpus.input_bytes, local_max_bytes=cfg.local_max_bytes,
                                ray_running=ray_running())
    t0 = time.time()
    if name == "ray":
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data's INFO lines would drown ours
        init_ray(cfg.num_cpus, ray_address)
        ex = RayExecutor(cfg)
    else:
        ex = LocalExecutor(cfg)
    seconds = time.time() - t0
    log(f"prepare: {name} executor, {ex.describe()} ({why})")
    return ex, why, seconds


def prepare(cfg: DataConfig, ray_address: str | None = None, log=print, force: bool = False, *,
            only_files: set[str] | None = None, prior_files: set[str] | None = None,
            allow_empty_splits: bool = False) -> dict:
    """Run the data stages; returns the manifest written to ``output_dir/manifest.json``.

    ``only_files``, ``prior_files`` (file labels) and ``allow_empty_splits`` serve `prepare
    --append` (append.py): it prepares just the new files of a dataset, however few, in a staging
    directory, deduplicating them against the files already in it."""
    t0 = time.time()
    corpus = _Corpus(cfg, only_files)
    dedup_corpus = _Corpus(cfg, only_files | prior_files) if only_files is not None and prior_files else corpus
    out = Path(cfg.output_dir)
    hashes = input_hashes(corpus.files)
    fps = fingerprints(cfg, corpus.files, hashes)
    if not force and _is_current(out, fps["shards"]):
        log(f"prepare: {out} is up to date (same inputs and config); nothing to do")
        return json.loads((out / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # invalid until this run finishes
    ex, why, start_seconds = _executor(cfg, corpus, ray_address, log)

    n = len(corpus.names)
    if cfg.dedup.exact or cfg.dedup.near:
        dedup = _stage(out, "dedup", fps["dedup"], force, lambda: _dedup(dedup_corpus, ex, out, fps["dedup"], log, prior_files), log,
                       files=(DUPLICATES, FILTERED))
        filtered = np.load(out / FILTERED)
    else:
        (out / DUPLICATES).write_text("")
        dedup = {"seconds": "off", "exact": [0] * n, "near": [0] * n}
        filtered = None  # no dedup pass: the later passes run the filters themselves
    removed = _removed_ids(out)
    removed_ref = ex.share(removed)
    filtered_ref = ex.share(filtered) if filtered is not None else None
    tok = _stage(out, "tokenizer", fps["tokenizer"], force,
                 lambda: _tokenizer(corpus, ex, out, fps["tokenizer"], removed_ref, filtered_ref, log), log)
    writers, counts, info = _shards(corpus, ex, out, removed, removed_ref, filtered_ref, log, allow_empty_splits)
    info.update(executor=ex.name, executor_note=why, start_seconds=start_seconds,
                inputs=[{"source": corpus.names[f.source], "file": f.label, "sha256": hashes[f.path]}
                        for f in corpus.files])
    manifest = _manifest(corpus, fps, dedup, tok, writers, counts, info, time.time() - t0)
    files = [TOKENIZER, QUARANTINE, DUPLICATES] + [f for w in writers.values() for f in w.files()]
    write_manifest(out, manifest, files)
    log("prepare: done\n" + summary_table(manifest))
    return manifest


def _manifest(corpus: _Corpus, fps: dict, dedup: dict, tok: dict, writers: dict, counts: _Counts, info: dict,
              seconds: float) -> dict:
    cfg, names = corpus.cfg, corpus.names
    sources = []
    for i, s in enumerate(cfg.sources):
        kept = sum(writers[split, i].documents for split in SPLITS)
        found = dedup["exact"][i] + dedup["near"][i]
        if int(counts.duplicates[i]) != found or counts.records[i] != kept + counts.quarantined[i] + found:
            raise RuntimeError(
                f"prepare: documents of source {names[i]!r} do not add up: {counts.records[i]} in, {kept} kept, "
                f"{counts.quarantined[i]} quarantined, {counts.duplicates[i]} duplicates dropped of {found} found")
        sources.append({
            "name": names[i], "path": s.path, "format": sorted({f.format for f in corpus.files if f.source == i}),
            "files": sum(1 for f in corpus.files if f.source == i), "text_field": s.text_field,
            "records": int(counts.records[i]), "kept": kept, "quarantined": int(counts.quarantined[i]),
            "duplicates": found, "duplicates_exact": dedup["exact"][i], "duplicates_near": dedup["near"][i],
            "tokens": {split: writers[split, i].num_tokens for split in SPLITS},
        })

    def split_info(split: str) -> dict:
        ws = [writers[split, i] for i in range(len(names))]
        return {"documents": sum(w.documents for w in ws), "tokens": sum(w.num_tokens for w in ws),
                "sources": {names[i]: {"documents": w.documents, "tokens": w.num_tokens, "shards": w.shards}
                            for i, w in enumerate(ws)}}

    total = {k: sum(s[k] for s in sources) for k in ("records", "kept", "quarantined", "duplicates")}
    ray_start = {"ray_start": round(info["start_seconds"], 3)} if info["executor"] == "ray" else {}
    return {
        "format": "megatron-mmidx",
        "code_version": pipeline.__version__,
        "fingerprint": fps["shards"],
        "stage_fingerprints": fps,
        "created_unix": int(time.time()),
        "executor": {"name": info["executor"], "why": info["executor_note"]},
        "dtype": info["dtype"],
        "tokenizer": {"file": TOKENIZER, "type": cfg.tokenizer.type, "vocab_size": info["vocab_size"],
                      "eod_token": cfg.tokenizer.eod, "special_ids": info["specials"], "encoder": info["encoder"],
                      "encoder_note": info["encoder_note"]},
        "splits": {split: split_info(split) for split in SPLITS},
        "sources": sources,
        "inputs": info["inputs"],  # what `prepare --append` compares new listings against
        "accounting": {"documents_in": total["records"], "kept": total["kept"],
                       "quarantined": total["quarantined"], "deduplicated": total["duplicates"]},
        "quarantine": {"file": QUARANTINE, "records": total["quarantined"],
                       "by_reason": dict(sorted(counts.by_reason.items()))},
        "dedup": {"file": DUPLICATES, "exact": sum(dedup["exact"]), "near": sum(dedup["near"]),
                  "config": cfg.dedup.model_dump()},
        "throughput": {
            "seconds": round(seconds, 3),
            "stage_seconds": {**ray_start, "dedup": _secs(dedup), "tokenizer": _secs(tok), "shards": _secs(info)},
            "tokens_per_s": round(info["tokens"] / max(info["seconds"], 1e-9)),
        },
        "config": cfg.model_dump(mode="json"),
    }


def _secs(stage: dict):
    v = stage["seconds"]
    return round(v, 3) if isinstance(v, float) else v
