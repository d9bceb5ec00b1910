"""`pretrain prepare`: raw jsonl → quarantine + tokenizer → tokenized, packed, verified shards.

Ray Data does the reading and the tokenizing; the driver only streams rows through in a fixed
order (``preserve_order``) so the output is the same whatever the number of workers, and writes
the shards as they arrive, so its memory does not grow with the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

import pipeline
from pipeline.config import ConfigError, DataConfig
from pipeline.data.manifest import MANIFEST, write_manifest
from pipeline.data.shards import RollingShardWriter, sha256_file, token_dtype
from pipeline.data.sources import read_jsonl
from pipeline.data.tokenizer import load_tokenizer, special_ids, train_tokenizer

SPLITS = ("train", "validation")


class PrepareError(ValueError):
    """The corpus cannot make a usable dataset (nothing left, or a split would be empty)."""


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Embedded Ray by default; `address` (or RAY_ADDRESS) joins an existing cluster."""
    import logging

    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)


def _read_source(item: dict) -> list[dict]:
    # empty strings, not None: Arrow turns an all-null column into float NaN
    return [
        {"source": r.source, "line": r.line, "text": r.text or "", "reason": r.reason or "", "raw": r.raw or ""}
        for r in read_jsonl(item["path"], item["source"], item["text_field"])
    ]


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def _tokenize_batch(batch: dict, tokenizer_json: str, eod_id: int) -> dict:
    """Tokenize the good records of a batch (quarantined ones were accounted for in pass 1)."""
    tok = _cached_tokenizer(tokenizer_json)
    good = [i for i, reason in enumerate(batch["reason"]) if not reason]
    encodings = tok.encode_batch([str(batch["text"][i]) for i in good], add_special_tokens=False)
    ids = [np.array(e.ids + [eod_id], dtype=np.int64) for e in encodings]
    return {"source": batch["source"][good], "line": batch["line"][good], "ids": ids}


def _fingerprint(cfg: DataConfig) -> str:
    """Inputs and config that decide the output; a re-run with the same one does no work."""
    h = hashlib.sha256()
    # blend weights and Ray's CPU count do not change the shards
    decided = cfg.model_dump(mode="json", exclude={"num_cpus": True, "sources": {"__all__": {"weight"}}})
    h.update(json.dumps(decided, sort_keys=True).encode())
    for src in cfg.sources:
        h.update(sha256_file(src.path).encode())
    if cfg.tokenizer.path:
        h.update(sha256_file(cfg.tokenizer.path).encode())
    h.update(pipeline.__version__.encode())
    return h.hexdigest()


def _is_current(out: Path, fingerprint: str) -> bool:
    from pipeline.data.manifest import ManifestError, verify_manifest

    try:
        manifest = verify_manifest(out)
    except ManifestError:
        return False
    return manifest.get("fingerprint") == fingerprint


def prepare(cfg: DataConfig, ray_address: str | None = None, log=print) -> dict:
    """Run the whole data stage; returns the manifest written to ``output_dir/manifest.json``."""
    import ray

    if not cfg.sources:
        raise ConfigError("data.sources: no sources configured; add at least one jsonl path")
    for i, src in enumerate(cfg.sources):
        if not Path(src.path).is_file():
            raise ConfigError(f"data.sources.{i}.path: no such file: {src.path}")
    out = Path(cfg.output_dir)
    fingerprint = _fingerprint(cfg)
    if _is_current(out, fingerprint):
        log(f"prepare: {out} is up to date (same inputs and config); nothing to do")
        return json.loads((out / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:  # shards of an earlier, different run
        shutil.rmtree(out / split, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)  # invalid until this run finishes
    t0 = time.time()
    init_ray(cfg.num_cpus, ray_address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True

    items = [
        {"source": i, "path": str(Path(s.path).resolve()), "text_field": s.text_field}
        for i, s in enumerate(cfg.sources)
    ]
    records = ray.data.from_items(items).flat_map(_read_source)

    # Pass 1: quarantine bad records, count, and train the tokenizer on the good ones.
    seen = Counter()
    kept = Counter()
    reasons = Counter()
    quarantine_path = out / "quarantine.jsonl"
    limit = cfg.tokenizer.train_sample_docs

    def good_texts():
        with open(quarantine_path, "w", encoding="utf-8") as q:
            for row in records.iter_rows():
                seen[row["source"]] += 1
                if row["reason"]:
                    reasons[row["reason"].split(":")[0]] += 1
                    q.write(json.dumps({
                        "source": cfg.sources[row["source"]].path, "line": row["line"],
                        "reason": row["reason"], "excerpt": row["raw"],
                    }) + "\n")
                    continue
                kept[row["source"]] += 1
                if limit is None or sum(kept.values()) <= limit:
                    yield row["text"]

    tok_cfg = cfg.tokenizer
    if tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path)
        for _ in good_texts():  # still account for and quarantine every record
            pass
    else:
        tokenizer = train_tokenizer(good_texts(), tok_cfg)
    if sum(seen.values()) != sum(kept.values()) + sum(reasons.values()):
        raise RuntimeError("prepare: record accounting does not add up (records != kept + quarantined)")
    if not kept:
        raise PrepareError(f"prepare: no usable documents in {[s.path for s in cfg.sources]}; see {quarantine_path}")
    specials = special_ids(tokenizer, tok_cfg)
    tokenizer_path = out / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    log(f"prepare: tokenizer {'loaded' if tok_cfg.path else 'trained'} ({tok_cfg.type}, vocabulary "
        f"{vocab_size}), {sum(kept.values())} documents kept, {sum(reasons.values())} quarantined")

    # Pass 2: tokenize in Ray workers, append end-of-document, stream into per-source split shards.
    tokenized = records.map_batches(
        _tokenize_batch, fn_kwargs={"tokenizer_json": tokenizer.to_str(), "eod_id": specials["eod"]},
        batch_size=256,
    )
    every = max(2, round(1 / cfg.validation_fraction))
    names = [s.resolved_name for s in cfg.sources]
    writers = {
        (split, i): RollingShardWriter(out, split, names[i], dtype, cfg.shard_max_tokens)
        for split in SPLITS for i in range(len(names))
    }
    n = 0
    try:
        for batch in tokenized.iter_batches(batch_size=1024, batch_format="numpy"):
            for source, ids in zip(batch["source"], batch["ids"]):
                split = "validation" if n % every == every - 1 else "train"
                writers[split, int(source)].add_document(ids)
                n += 1
    finally:
        for w in writers.values():
            w.close()
    for split in SPLITS:
        if sum(writers[split, i].num_tokens for i in range(len(names))) < 2:
            raise PrepareError(
                f"prepare: the {split} split is empty ({n} documents kept); add documents or "
                f"raise data.validation_fraction"
            )

    def split_info(split: str) -> dict:
        ws = [writers[split, i] for i in range(len(names))]
        return {
            "documents": sum(w.documents for w in ws),
            "tokens": sum(w.num_tokens for w in ws),
            "sources": {
                names[i]: {"documents": w.documents, "tokens": w.num_tokens, "shards": w.shards}
                for i, w in enumerate(ws)
            },
        }

    manifest = {
        "format": "megatron-mmidx",
        "code_version": pipeline.__version__,
        "fingerprint": fingerprint,
        "created_unix": int(time.time()),
        "dtype": dtype.name,
        "tokenizer": {
            "file": "tokenizer.json", "type": tok_cfg.type, "vocab_size": vocab_size,
            "eod_token": tok_cfg.eod, "special_ids": specials,
        },
        "splits": {split: split_info(split) for split in SPLITS},
        "sources": [
            {"name": names[i], "path": s.path, "text_field": s.text_field, "records": seen[i], "kept": kept[i],
             "quarantined": seen[i] - kept[i]}
            for i, s in enumerate(cfg.sources)
        ],
        "quarantine": {"file": "quarantine.jsonl", "records": sum(reasons.values()), "by_reason": dict(reasons)},
        "config": cfg.model_dump(mode="json"),
    }
    files = ["tokenizer.json", "quarantine.jsonl"] + [f for w in writers.values() for f in w.files()]
    write_manifest(out, manifest, files)
    tokens = sum(manifest["splits"][s]["tokens"] for s in SPLITS)
    log(f"prepare: wrote {tokens} tokens in {n} documents to {out} in {time.time() - t0:.1f}s "
        f"(train {manifest['splits']['train']['tokens']}, validation {manifest['splits']['validation']['tokens']})")
    return manifest
