"""Bookkeeping for `pretrain prepare`'s stages: fingerprints, completion records, progress, report.

A stage is done when ``.stages/<name>.json`` holds the fingerprint of everything its output depends
on and the sha256 of each file it wrote. The record is written (atomically) only after the stage's
files, so an interrupted run continues from the last completed stage, and a changed config field
re-runs only the stages whose fingerprint it enters (fingerprints chain: scan → tokenizer → shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pipeline
from pipeline.config import DataConfig
from pipeline.data.shards import sha256_file
from pipeline.data.sources import SourceFile

STAGE_DIR = ".stages"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _input_hash(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():  # a saved HF dataset: every file in it
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return _digest([(p.relative_to(path).as_posix(), sha256_file(p)) for p in files])
    return sha256_file(path)


def input_hashes(files: list[SourceFile]) -> dict[str, str]:
    """sha256 of every input path (a saved HF dataset: of all its files together)."""
    return {path: _input_hash(path) for path in sorted({sf.path for sf in files})}


def fingerprints(cfg: DataConfig, files: list[SourceFile], hashes: dict[str, str] | None = None) -> dict[str, str]:
    """Fingerprint of each stage's output: the earlier stage's, its config fields, the code version."""
    sources = [s.model_dump(include={"path", "format", "text_field", "text_unit"}) for s in cfg.sources]
    hashes = input_hashes(files) if hashes is None else hashes
    dedup = cfg.dedup.model_dump(include={"exact", "near"} if not cfg.dedup.near else None)
    kept = _digest("dedup", pipeline.__version__, sources, [(f.label, f.format) for f in files], hashes,
                   cfg.clean.model_dump(), dedup)  # which documents are kept, and their cleaned text
    tok = cfg.tokenizer.model_dump(exclude={"fast_encoder"})
    if cfg.tokenizer.path:  # a given tokenizer does not depend on the corpus
        tokenizer = _digest("tokenizer", pipeline.__version__, tok, sha256_file(cfg.tokenizer.path))
    else:
        tokenizer = _digest("tokenizer", pipeline.__version__, tok, kept)
    shards = _digest("shards", pipeline.__version__, kept, tokenizer, [s.resolved_name for s in cfg.sources],
                     cfg.validation_fraction, cfg.shard_max_tokens)
    return {"dedup": kept, "tokenizer": tokenizer, "shards": shards}


def load_stage(out: Path, name: str, fingerprint: str) -> dict | None:
    """The completion record of a stage if it matches ``fingerprint`` and its files are intact."""
    path = out / STAGE_DIR / f"{name}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    for file, digest in record.get("files", {}).items():
        if not (out / file).is_file() or sha256_file(out / file) != digest:
            return None
    return record


def save_stage(out: Path, name: str, fingerprint: str, files: list[str], **info) -> dict:
    record = {"fingerprint": fingerprint, "files": {f: sha256_file(out / f) for f in files}, **info}
    (out / STAGE_DIR).mkdir(parents=True, exist_ok=True)
    tmp = out / STAGE_DIR / f"{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / STAGE_DIR / f"{name}.json")
    return record


class Progress:
    """Logs a stage's counters every ``every_s`` seconds while it streams."""

    def __init__(self, stage: str, log, every_s: float = 5.0):
        self.stage, self.log, self.every_s = stage, log, every_s
        self.t0 = self.last = time.time()
        self.documents = self.tokens = 0

    def update(self, documents: int = 0, tokens: int = 0) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.documents / max(now - self.t0, 1e-9)
            msg = f"{self.stage}: {self.documents:,} documents ({rate:,.0f}/s)"
            if self.tokens:
                msg += f", {self.tokens:,} tokens ({self.tokens / max(now - self.t0, 1e-9):,.0f}/s)"
            self.log(msg)

    @property
    def seconds(self) -> float:
        return time.time() - self.t0


def summary_table(manifest: dict) -> str:
    """Documents in/out per source, quarantine by reason, duplicates, tokens per split, throughput."""
    head = ("source", "documents", "quarantined", "duplicates", "kept", "train tokens", "validation tokens")
    rows = []
    for s in manifest["sources"]:
        rows.append((s["name"], s["records"], s["quarantined"], s["duplicates"], s["kept"],
                     s["tokens"]["train"], s["tokens"]["validation"]))
    totals = tuple(sum(r[i] for r in rows) for i in range(1, len(head)))
    rows.append(("total", *totals))
    cells = [head] + [tuple(r[0:1]) + tuple(f"{v:,}" for v in r[1:]) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    lines = ["  ".join(str(c[i]).ljust(widths[i]) if i == 0 else str(c[i]).rjust(widths[i]) for i in range(len(head)))
             for c in cells]
    q, d, t = manifest["quarantine"], manifest["dedup"], manifest["throughput"]
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(q["by_reason"].items())) or "none"
    lines.append(f"quarantined by reason: {reasons}  ({q['file']})")
    lines.append(f"duplicates removed: exact {d['exact']:,}, near {d['near']:,}  ({d['file']})")
    stages = ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" if isinstance(v, float) else f"{k} {v}"
                       for k, v in t["stage_seconds"].items())
    lines.append(f"time: {t['seconds']:.1f}s ({stages}); tokenize+shards {t['tokens_per_s']:,.0f} tokens/s "
                 f"with the {manifest['tokenizer']['encoder']} encoder")
    return "\n".join(lines)
