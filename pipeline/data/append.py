"""`pretrain prepare --append`: grow a prepared dataset with new input files, touching nothing in it.

Continued pretraining adds data to a dataset a run is already training on. Rebuilding the dataset
would re-cut every shard and change every sample's tokens; appending instead:

1. finds the input files that are new (every input of the dataset is recorded in its manifest with
   its sha256; a recorded input that has *changed* is refused: what was trained on cannot change);
2. prepares only those files in a staging directory, with the dataset's own tokenizer, through the
   same stages as `pretrain prepare` (clean, quarantine, encode; dedup, when on, reads the files
   already in the dataset too, so a new copy of an old document is removed, never the old one);
3. moves the new shards in as the next shards of each source and split (``train/docs-00003`` …),
   adds this append's quarantine and duplicates as files of their own, and
4. writes the grown manifest last (the commit point): the old files and their hashes unchanged,
   the new ones added, counts summed, and ``lineage`` extended with the sha256 of the manifest it
   grew from. An interrupted append leaves the old manifest valid and is simply run again.

A run resumed on the grown dataset starts a new data era (eras.py): samples already trained keep
their ids and order, the new samples are mixed into what was left of the interrupted epoch.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.manifest import MANIFEST, manifest_sha256, verify_manifest, write_manifest
from pipeline.data.prepare import PrepareError
from pipeline.data.sources import list_source_files
from pipeline.data.stages import input_hashes

STAGING = ".append-staging"


class AppendError(PrepareError):
    """The dataset cannot be grown with these inputs (one line, naming the file or field)."""


def input_records(cfg: DataConfig) -> list[dict]:
    """Every input file of ``cfg`` with its sha256, as the manifest's ``inputs`` lists them."""
    files = [f for i, s in enumerate(cfg.sources) for f in list_source_files(s, i)]
    hashes = input_hashes(files)
    return [{"source": cfg.sources[f.source].resolved_name, "file": f.label, "sha256": hashes[f.path]} for f in files]


def _new_inputs(cfg: DataConfig, old: dict, log) -> tuple[list[dict], list[dict]]:
    """(every input listed now, the new ones among them); a changed recorded input is refused."""
    recorded = old.get("inputs")
    if recorded is None:
        raise AppendError(f"{cfg.output_dir}/{MANIFEST}: records no input files (written by an older version); "
                          f"run `pretrain prepare --force` once, then append")
    known = {(r["source"], r["file"]): r["sha256"] for r in recorded}
    listed, new = input_records(cfg), []
    for rec in listed:
        was = known.get((rec["source"], rec["file"]))
        if was is None:
            new.append(rec)
        elif was != rec["sha256"]:
            raise AppendError(
                f"{rec['file']}: changed since it was prepared into {cfg.output_dir} (sha256 {was[:12]}… → "
                f"{rec['sha256'][:12]}…); appending never rewrites data already in shards: restore the file, "
                f"or add the new text as a new file, or rebuild with `pretrain prepare --force`")
    gone = len(set(known) - {(r["source"], r["file"]) for r in listed})
    if gone:
        log(f"append: {gone} recorded input file(s) no longer listed; their shards stay in the dataset "
            f"(and new documents are not deduplicated against them)")
    return listed, new


def _check_compatible(cfg: DataConfig, old: dict) -> None:
    tok = old["tokenizer"]
    if cfg.tokenizer.type != tok["type"]:
        raise AppendError(f"data.tokenizer.type: {cfg.tokenizer.type!r}, but {cfg.output_dir} was prepared "
                          f"with {tok['type']!r}; an append always uses the dataset's own tokenizer")
    old_names = [s["name"] for s in old["sources"]]
    names = [s.resolved_name for s in cfg.sources]
    missing = [n for n in old_names if n not in names]
    if missing:
        raise AppendError(f"data.sources: {missing} are in {cfg.output_dir} but not in the config; an append "
                          f"keeps every source (list them, even without new files)")
    order = [n for n in names if n in old_names]
    if order != old_names:
        raise AppendError(f"data.sources: the dataset's sources must keep their order {old_names} (new "
                          f"sources go after them)")


def append(cfg: DataConfig, ray_address: str | None = None, log=print) -> dict:
    """Grow ``cfg.output_dir`` with the config's new input files; returns the new manifest."""
    from pipeline.data.prepare import prepare

    out = Path(cfg.output_dir)
    t0 = time.time()
    if not (out / MANIFEST).exists():  # nothing to grow yet: this is the first preparation
        log(f"append: {out} holds no dataset yet; preparing it")
        return prepare(cfg, ray_address=ray_address, log=log)
    old = verify_manifest(out)  # a corrupt dataset is refused before anything is added to it
    old_sha = manifest_sha256(out)
    _check_compatible(cfg, old)
    listed, new = _new_inputs(cfg, old, log)
    dedup = cfg.dedup.exact or cfg.dedup.near
    if not new:
        log(f"append: no new input files; {out} is unchanged")
        return old
    log(f"append: {len(new)} new input file(s): " + ", ".join(f"{r['source']}:{Path(r['file']).name}" for r in new[:8])
        + (" …" if len(new) > 8 else ""))
    stage = out / STAGING
    shutil.rmtree(stage, ignore_errors=True)
    scfg = cfg.model_copy(deep=True)
    scfg.output_dir = str(stage)
    scfg.tokenizer.path = str(out / old["tokenizer"]["file"])
    try:
        # dedup reads the files already in the dataset too: their documents win over new copies
        prior = {r["file"] for r in old["inputs"]} & {r["file"] for r in listed} if dedup else None
        prepare(scfg, ray_address=ray_address, log=log, force=True, only_files={r["file"] for r in new},
                prior_files=prior or None, allow_empty_splits=True)
    except PrepareError as exc:
        raise AppendError(f"append: {exc}") from None
    added = verify_manifest(stage)  # with the sha256 of every staged file
    manifest = _merge(out, stage, old, old_sha, added, new, time.time() - t0,
                      "the appended documents against each other and against the dataset's files" if dedup else "off")
    files = [name for name in manifest["files"]]
    write_manifest(out, {k: v for k, v in manifest.items() if k != "files"}, files)
    shutil.rmtree(stage, ignore_errors=True)
    g = manifest["appends"][-1]
    log(f"append: done: +{g['kept']:,} documents, +{g['tokens']['train']:,} train / "
        f"+{g['tokens']['validation']:,} validation tokens; dataset now {manifest['splits']['train']['tokens']:,} "
        f"train tokens (generation {len(manifest['lineage'])}; runs on it continue where they stopped)")
    return manifest


def _merge(out: Path, stage: Path, old: dict, old_sha: str, added: dict, inputs: list[dict], seconds: float,
           dedup_scope: str) -> dict:
    """The grown manifest; moves the staged shards, quarantine and duplicates into ``out``."""
    m = copy.deepcopy(old)
    generation = len(m.get("lineage") or []) + 1
    files = dict(m["files"])
    tokens = {}
    for split, info in added["splits"].items():
        target = m["splits"].setdefault(split, {"documents": 0, "tokens": 0, "sources": {}})
        (out / split).mkdir(parents=True, exist_ok=True)
        for name, src in info["sources"].items():
            have = target["sources"].setdefault(name, {"documents": 0, "tokens": 0, "shards": []})
            for k, prefix in enumerate(src["shards"]):
                dest = f"{split}/{name}-{len(have['shards']):05d}"
                for ext in ("bin", "idx"):
                    os.replace(stage / f"{prefix}.{ext}", out / f"{dest}.{ext}")
                    files[f"{dest}.{ext}"] = added["files"][f"{prefix}.{ext}"]
                have["shards"].append(dest)
            have["documents"] += src["documents"]
            have["tokens"] += src["tokens"]
        target["documents"] += info["documents"]
        target["tokens"] += info["tokens"]
        tokens[split] = info["tokens"]
    extra = {}
    for kind, name in (("quarantine", added["quarantine"]["file"]), ("duplicates", added["dedup"]["file"])):
        dest = f"{Path(name).stem}-append{generation}.jsonl"
        os.replace(stage / name, out / dest)
        files[dest] = added["files"][name]
        extra[kind] = dest
    by_name = {s["name"]: s for s in m["sources"]}
    for s in added["sources"]:
        have = by_name.get(s["name"])
        if have is None:
            m["sources"].append(s)
            continue
        for key in ("records", "kept", "quarantined", "duplicates", "duplicates_exact", "duplicates_near", "files"):
            have[key] = have.get(key, 0) + s.get(key, 0)
        for split, n in s["tokens"].items():
            have["tokens"][split] = have["tokens"].get(split, 0) + n
    acc = added["accounting"]
    for key in ("documents_in", "kept", "quarantined", "deduplicated"):
        m["accounting"][key] += acc[key]
    by_reason = dict(m["quarantine"].get("by_reason", {}))
    for reason, n in added["quarantine"]["by_reason"].items():
        by_reason[reason] = by_reason.get(reason, 0) + n
    m["quarantine"] |= {"records": m["quarantine"]["records"] + added["quarantine"]["records"],
                        "by_reason": dict(sorted(by_reason.items()))}
    m["dedup"]["exact"] += added["dedup"]["exact"]
    m["dedup"]["near"] += added["dedup"]["near"]
    m["lineage"] = list(m.get("lineage") or []) + [old_sha]
    m["inputs"] = list(m["inputs"]) + inputs
    m["appends"] = list(m.get("appends") or []) + [{
        "generation": generation, "created_unix": int(time.time()), "grew_from_manifest_sha256": old_sha,
        "inputs": [r["file"] for r in inputs], "documents_in": acc["documents_in"], "kept": acc["kept"],
        "quarantined": acc["quarantined"], "deduplicated": acc["deduplicated"], "tokens": tokens,
        "quarantine_file": extra["quarantine"], "duplicates_file": extra["duplicates"],
        "encoder": added["tokenizer"]["encoder"], "seconds": round(seconds, 3),
        "dedup_scope": dedup_scope,
    }]
    m["fingerprint"] = None  # an appended dataset is never "up to date" for a plain rebuild
    m["files"] = files
    return m


def refuse_rebuild(cfg: DataConfig) -> None:
    """A plain `prepare` over a dataset that grew by appends would rebuild it and break the runs
    continuing on it: refuse, unless --force."""
    path = Path(cfg.output_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    if manifest.get("appends"):
        raise AppendError(
            f"{cfg.output_dir}: grew by `prepare --append` ({len(manifest['appends'])} time(s)); a plain prepare "
            f"would rebuild every shard and stop runs on it from resuming. Use `pretrain prepare --append` "
            f"to add new files, or `--force` to rebuild it anyway")
