"""`pretrain prepare --append`: grow a prepared dataset with new input files, touching nothing in it.

Continued pretraining adds data to a dataset a run is already training on. Rebuilding the dataset
would re-cut every shard and change every sample's tokens; appending instead:

1. finds the input files that are new (every input of the dataset is recorded in its manifest with
   its sha256; a recorded input that has *changed* is refused: what was trained on cannot change);
2. prepares only those files in a staging directory, with the dataset's own tokenizer, through the
   same stages as `pretrain prepare` (clean, quarantine, encode; dedup, when on, reads the files
   already in the dataset too, so a new copy of an old document is removed, never the old one):
   `NewFiles` is the `stages.Scope` that says so;
3. moves the new shards in as the next shards of each source and split (``train/docs-00003`` …),
   adds this append's quarantine and duplicates as files of their own, and
4. writes the grown manifest last (the commit point): the old files and their hashes unchanged,
   the new ones added, counts summed, and ``lineage`` extended with the sha256 of the manifest it
   grew from (`merge`). An interrupted append leaves the old manifest valid and is simply run again.

A run resumed on the grown dataset starts a new data era (eras.py): samples already trained keep
their ids and order, the new samples are mixed into what was left of the interrupted epoch.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data import interrupt
from pipeline.data.dedup import Duplicate
from pipeline.data.manifest import (
    AppendInfo, InputFile, Manifest, ManifestError, ShardSet, SourceInfo, SplitInfo, manifest_sha256,
    read_manifest, verify_manifest, write_manifest,
)
from pipeline.data.prepare import PrepareError, prepare
from pipeline.data.sources import Corpus, list_source_files
from pipeline.data.stages import Scope, input_hashes
from pipeline.rundir import DatasetDir
from pipeline.storage import NoSpace, free_bytes


class AppendError(PrepareError):
    """The dataset cannot be grown with these inputs (one line, naming the file or field)."""


def input_records(cfg: DataConfig) -> list[InputFile]:
    """Every input file of ``cfg`` with its sha256, as the manifest's ``inputs`` lists them."""
    files = [f for i, s in enumerate(cfg.sources) for f in list_source_files(s, i)]
    hashes = input_hashes(files)
    return [InputFile(source=cfg.sources[f.source].resolved_name, file=f.label, sha256=hashes[f.path]) for f in files]


def _new_inputs(cfg: DataConfig, old: Manifest, log) -> tuple[list[InputFile], list[InputFile]]:
    """(every input listed now, the new ones among them); a changed recorded input is refused."""
    if old.inputs is None:
        raise AppendError(f"{DatasetDir(cfg.output_dir).manifest}: records no input files (written by an older "
                          f"version); run `pretrain prepare --force` once, then append")
    known = {(r.source, r.file): r.sha256 for r in old.inputs}
    listed, new = input_records(cfg), []
    for rec in listed:
        was = known.get((rec.source, rec.file))
        if was is None:
            new.append(rec)
        elif was != rec.sha256:
            raise AppendError(
                f"{rec.file}: changed since it was prepared into {cfg.output_dir} (sha256 {was[:12]}… → "
                f"{rec.sha256[:12]}…); appending never rewrites data already in shards: restore the file, "
                f"or add the new text as a new file, or rebuild with `pretrain prepare --force`")
    gone = len(set(known) - {(r.source, r.file) for r in listed})
    if gone:
        log(f"append: {gone} recorded input file(s) no longer listed; their shards stay in the dataset "
            f"(and new documents are not deduplicated against them)")
    return listed, new


def _check_compatible(cfg: DataConfig, old: Manifest) -> None:
    if cfg.tokenizer.type != old.tokenizer.type:
        raise AppendError(f"data.tokenizer.type: {cfg.tokenizer.type!r}, but {cfg.output_dir} was prepared "
                          f"with {old.tokenizer.type!r}; an append always uses the dataset's own tokenizer")
    old_names = [s.name for s in old.sources]
    names = [s.resolved_name for s in cfg.sources]
    missing = [n for n in old_names if n not in names]
    if missing:
        raise AppendError(f"data.sources: {missing} are in {cfg.output_dir} but not in the config; an append "
                          f"keeps every source (list them, even without new files)")
    order = [n for n in names if n in old_names]
    if order != old_names:
        raise AppendError(f"data.sources: the dataset's sources must keep their order {old_names} (new "
                          f"sources go after them)")


# ---- preparing the new files ------------------------------------------------------------------------

def prefer_prior(duplicates: list[Duplicate], is_prior: Callable[[int], bool]) -> list[Duplicate]:
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


class NewFiles(Scope):
    """Prepare only the ``new`` input files (labels). Dedup also reads the ``prior`` ones (files of
    the dataset still listed) and their documents win; a split may come out empty (a few documents)."""

    allow_empty_splits = True
    commits = False

    def __init__(self, new: set[str], prior: set[str]):
        self.new, self.prior = set(new), set(prior)

    def corpus(self, cfg: DataConfig) -> Corpus:
        return Corpus(cfg, self.new)

    def dedup_corpus(self, cfg: DataConfig, corpus: Corpus) -> Corpus:
        return Corpus(cfg, self.new | self.prior) if self.prior else corpus

    def settle(self, duplicates: list[Duplicate], corpus: Corpus) -> list[Duplicate]:
        if not self.prior:
            return duplicates
        return prefer_prior(duplicates, lambda doc_id: corpus.file_of(doc_id).label in self.prior)


def _prepare_new(cfg: DataConfig, data: DatasetDir, old: Manifest, listed: list[InputFile], new: list[InputFile],
                 ray_address: str | None, log) -> Manifest:
    """Prepare the new files in the staging directory with the dataset's tokenizer; its verified manifest."""
    staged = data.staging
    data.storage.delete_tree(DatasetDir.APPEND_STAGING)
    scfg = cfg.model_copy(deep=True)
    scfg.output_dir = str(staged.root)
    scfg.tokenizer.path = str(data.path(old.tokenizer.file))
    # dedup reads the files already in the dataset too: their documents win over new copies
    prior = {r.file for r in old.inputs} & {r.file for r in listed} if cfg.dedup.exact or cfg.dedup.near else set()
    try:
        prepare(scfg, ray_address=ray_address, log=log, force=True, scope=NewFiles({r.file for r in new}, prior))
    except PrepareError as exc:
        raise AppendError(f"append: {exc}") from None
    return verify_manifest(staged.root)  # with the sha256 of every staged file


def append(cfg: DataConfig, ray_address: str | None = None, log=print) -> Manifest:
    """Grow ``cfg.output_dir`` with the config's new input files; returns the new manifest."""
    data = DatasetDir(cfg.output_dir)
    t0 = time.time()
    if not data.storage.exists(DatasetDir.MANIFEST):  # nothing to grow yet: this is the first preparation
        log(f"append: {data.root} holds no dataset yet; preparing it")
        return prepare(cfg, ray_address=ray_address, log=log)
    old = verify_manifest(data.root)  # a corrupt dataset is refused before anything is added to it
    old_sha = manifest_sha256(data.root)
    _check_compatible(cfg, old)
    listed, new = _new_inputs(cfg, old, log)
    if not new:
        log(f"append: no new input files; {data.root} is unchanged")
        return old
    log(f"append: {len(new)} new input file(s): " + ", ".join(f"{r.source}:{Path(r.file).name}" for r in new[:8])
        + (" …" if len(new) > 8 else ""))
    try:
        added = _prepare_new(cfg, data, old, listed, new, ray_address, log)
    except NoSpace as exc:  # the staged files are debris: free their space before saying what is free
        data.storage.delete_tree(DatasetDir.APPEND_STAGING)
        raise NoSpace(exc.path, exc.needed, free_bytes(exc.path)) from None
    scope = ("the appended documents against each other and against the dataset's files"
             if cfg.dedup.exact or cfg.dedup.near else "off")
    interrupt.check()  # a signal during the staging run: the dataset is left as it was
    grown = merge(data, old, old_sha, added, new, time.time() - t0, scope)
    grown = write_manifest(data.root, grown, list(grown.files))
    interrupt.committed()
    data.storage.delete_tree(DatasetDir.APPEND_STAGING)
    g = grown.appends[-1]
    log(f"append: done: +{g.kept:,} documents, +{g.tokens.get('train', 0):,} train / "
        f"+{g.tokens.get('validation', 0):,} validation tokens; dataset now {grown.splits['train'].tokens:,} "
        f"train tokens (generation {len(grown.lineage)}; runs on it continue where they stopped); "
        f"this append's quarantine: {g.quarantined:,} in {data.path(g.quarantine_file)}, duplicates: "
        f"{g.deduplicated:,} in {data.path(g.duplicates_file)}")
    return grown


# ---- the grown manifest -----------------------------------------------------------------------------

def merge(data: DatasetDir, old: Manifest, old_sha: str, added: Manifest, inputs: list[InputFile], seconds: float,
          dedup_scope: str) -> Manifest:
    """The grown manifest of ``data`` (``files``: the old hashes and the staged ones), after moving the
    staged shards, quarantine and duplicates (``added`` is the staging dataset's manifest) into it."""
    grown = old.model_copy(deep=True)
    generation = len(grown.lineage) + 1
    tokens = _move_shards(data, grown, added)
    quarantine_file = _move_beside(data, grown, added, added.quarantine.file, generation)
    duplicates_file = _move_beside(data, grown, added, added.dedup.file, generation)
    _add_sources(grown.sources, added.sources)
    _add_totals(grown, added)
    acc = added.accounting
    grown.appends = [*grown.appends, AppendInfo(
        generation=generation, created_unix=int(time.time()), grew_from_manifest_sha256=old_sha,
        inputs=[r.file for r in inputs], documents_in=acc.documents_in, kept=acc.kept, quarantined=acc.quarantined,
        deduplicated=acc.deduplicated, tokens=tokens, quarantine_file=quarantine_file,
        duplicates_file=duplicates_file, encoder=added.tokenizer.encoder, seconds=round(seconds, 3),
        dedup_scope=dedup_scope)]
    grown.lineage = [*grown.lineage, old_sha]
    grown.inputs = [*(grown.inputs or []), *inputs]
    grown.fingerprint = None  # an appended dataset is never "up to date" for a plain rebuild
    return grown


def _move_shards(data: DatasetDir, grown: Manifest, added: Manifest) -> dict[str, int]:
    """The staged shards as the next shards of their source and split; tokens added per split."""
    store, tokens = data.storage, {}
    for split, info in added.splits.items():
        target = grown.splits.setdefault(split, SplitInfo(sources={}))
        for name, src in info.sources.items():
            have = target.sources.setdefault(name, ShardSet(shards=[]))
            for prefix in src.shards:
                dest = DatasetDir.shard_prefix(split, name, len(have.shards))
                for ext in ("bin", "idx"):
                    store.move(data.staged(f"{prefix}.{ext}"), f"{dest}.{ext}")
                    grown.files[f"{dest}.{ext}"] = added.files[f"{prefix}.{ext}"]
                have.shards.append(dest)
            have.documents += src.documents
            have.tokens += src.tokens
        target.documents += info.documents
        target.tokens += info.tokens
        tokens[split] = info.tokens
    return tokens


def _move_beside(data: DatasetDir, grown: Manifest, added: Manifest, name: str, generation: int) -> str:
    """A staged quarantine or duplicates file as this append's own (``quarantine-append2.jsonl``)."""
    dest = DatasetDir.appended(name, generation)
    data.storage.move(data.staged(name), dest)
    grown.files[dest] = added.files[name]
    return dest


def _add_sources(sources: list[SourceInfo], added: list[SourceInfo]) -> None:
    """Sum each source's counts; a source new to the dataset is added as it is."""
    by_name = {s.name: s for s in sources}
    for s in added:
        have = by_name.get(s.name)
        if have is None:
            sources.append(s.model_copy(deep=True))
            continue
        have.files += s.files
        have.records += s.records
        have.kept += s.kept
        have.quarantined += s.quarantined
        have.duplicates += s.duplicates
        have.duplicates_exact += s.duplicates_exact
        have.duplicates_near += s.duplicates_near
        for split, n in s.tokens.items():
            have.tokens[split] = have.tokens.get(split, 0) + n


def _add_totals(grown: Manifest, added: Manifest) -> None:
    """The dataset's accounting, quarantine and dedup counts, summed."""
    acc, more = grown.accounting, added.accounting
    acc.documents_in += more.documents_in
    acc.kept += more.kept
    acc.quarantined += more.quarantined
    acc.deduplicated += more.deduplicated
    by_reason = Counter(grown.quarantine.by_reason)
    by_reason.update(added.quarantine.by_reason)
    grown.quarantine.records += added.quarantine.records
    grown.quarantine.by_reason = dict(sorted(by_reason.items()))
    grown.dedup.exact += added.dedup.exact
    grown.dedup.near += added.dedup.near


def refuse_rebuild(cfg: DataConfig) -> None:
    """A plain `prepare` over a dataset that grew by appends would rebuild it and break the runs
    continuing on it: refuse, unless --force."""
    try:
        manifest = read_manifest(cfg.output_dir)
    except ManifestError:  # none, or unreadable: nothing a rebuild could break
        return
    if manifest.appends:
        raise AppendError(
            f"{cfg.output_dir}: grew by `prepare --append` ({len(manifest.appends)} time(s)); a plain prepare "
            f"would rebuild every shard and stop runs on it from resuming. Use `pretrain prepare --append` "
            f"to add new files, or `--force` to rebuild it anyway")
