"""manifest.json: what a prepared dataset holds, and the sha256 of every file it is made of.

Training and evaluation call `verify_manifest` before reading a single token, so a flipped byte, a
truncated index or a swapped tokenizer is refused with the file's name instead of trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.errors import CorruptFile, UserError
from pipeline.records import Record
from pipeline.rundir import DatasetDir
from pipeline.storage import open_storage

MANIFEST = DatasetDir.MANIFEST


class ManifestError(UserError):
    """A prepared dataset that is missing, incomplete or altered since it was written."""


class CorruptManifest(ManifestError, CorruptFile):
    """A dataset file whose bytes are not what the manifest says, or a manifest that does not parse."""


class _Part(Record):
    error = CorruptManifest


class ShardSet(_Part):
    """One source's shards in one split."""

    documents: int = 0
    tokens: int = 0
    shards: list[str]


class SplitInfo(_Part):
    documents: int = 0
    tokens: int = 0
    sources: dict[str, ShardSet]


class TokenizerInfo(_Part):
    file: str
    type: str = ""
    vocab_size: int | None = None
    eod_token: str | None = None
    special_ids: dict[str, int] = Field(default_factory=dict)
    encoder: str = ""
    encoder_note: str = ""

    @property
    def eod_id(self) -> int | None:
        return self.special_ids.get("eod")


class SourceInfo(_Part):
    """What one configured source became: documents in, kept, quarantined, deduplicated, tokens."""

    name: str
    path: str = ""
    format: list[str] = Field(default_factory=list)
    files: int = 0
    text_field: str = "text"
    records: int = 0
    kept: int = 0
    quarantined: int = 0
    duplicates: int = 0
    duplicates_exact: int = 0
    duplicates_near: int = 0
    tokens: dict[str, int] = Field(default_factory=dict)


class InputFile(_Part):
    """An input file the dataset was prepared from, with its sha256 (what `--append` compares)."""

    source: str
    file: str
    sha256: str


class Accounting(_Part):
    """documents_in = kept + quarantined + deduplicated, over the whole dataset."""

    documents_in: int = 0
    kept: int = 0
    quarantined: int = 0
    deduplicated: int = 0


class QuarantineInfo(_Part):
    file: str = DatasetDir.QUARANTINE
    records: int = 0
    by_reason: dict[str, int] = Field(default_factory=dict)


class DedupInfo(_Part):
    file: str = DatasetDir.DUPLICATES
    exact: int = 0
    near: int = 0
    config: dict[str, Any] = Field(default_factory=dict)


class AppendInfo(_Part):
    """One `prepare --append`: what it added and where its quarantine and duplicates went."""

    generation: int
    created_unix: int = 0
    grew_from_manifest_sha256: str
    inputs: list[str] = Field(default_factory=list)
    documents_in: int = 0
    kept: int = 0
    quarantined: int = 0
    deduplicated: int = 0
    tokens: dict[str, int] = Field(default_factory=dict)
    quarantine_file: str = ""
    duplicates_file: str = ""
    encoder: str = ""
    seconds: float = 0.0
    dedup_scope: str = ""


class Manifest(Record):
    """``manifest.json``. Required: ``files`` (the sha256 of every file), ``splits`` (which shards
    training reads) and ``tokenizer.file``; the rest describes how the dataset was made."""

    error = CorruptManifest
    format: str = "megatron-mmidx"
    code_version: str = ""
    fingerprint: str | None = None  # None: grown by appends, never "up to date" for a plain rebuild
    stage_fingerprints: dict[str, str] = Field(default_factory=dict)
    created_unix: int = 0
    executor: dict[str, str] = Field(default_factory=dict)
    dtype: str = ""
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    sources: list[SourceInfo] = Field(default_factory=list)
    inputs: list[InputFile] | None = None  # None: written before inputs were recorded
    accounting: Accounting = Field(default_factory=Accounting)
    quarantine: QuarantineInfo = Field(default_factory=QuarantineInfo)
    dedup: DedupInfo = Field(default_factory=DedupInfo)
    throughput: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    lineage: list[str] = Field(default_factory=list)  # sha256 of every manifest this one grew from
    appends: list[AppendInfo] = Field(default_factory=list)
    files: dict[str, str]

    def check(self, path: str) -> None:
        if not self.files:
            raise self.error(path, "lists no files")
        read = [f"{prefix}.{ext}" for split in self.splits.values() for src in split.sources.values()
                for prefix in src.shards for ext in ("bin", "idx")] + [self.tokenizer.file]
        unhashed = [name for name in read if name not in self.files]
        if unhashed:  # a shard named in `splits` but absent from `files` would be read unverified
            raise ManifestError(f"{path}: {unhashed[0]!r} is read by training but has no sha256 in `files`")

    @classmethod
    def coerce(cls, manifest: Manifest | dict, path: str = "(manifest)") -> Manifest:
        """A Manifest from a Manifest or its JSON dict (scripts that loaded the file themselves)."""
        return manifest if isinstance(manifest, Manifest) else cls.from_dict(manifest, path)

    def source_names(self, split: str = "train") -> list[str]:
        return list(self.splits[split].sources) if split in self.splits else []

    def grew_from(self, trained_sha: str, current_sha: str) -> bool:
        """True when a checkpoint trained on ``trained_sha`` may continue on this manifest (whose
        own sha256 is ``current_sha``): the same dataset, or one grown from it by `prepare --append`."""
        return trained_sha == current_sha or trained_sha in self.lineage


def _safe_child(root: Path, name: str) -> Path:
    store = open_storage(root)
    if not store.inside(name):
        raise ManifestError(f"{root / MANIFEST}: file entry {name!r} points outside the dataset directory")
    return store.path(name).resolve()


def write_manifest(root: Path, manifest: Manifest | dict, files: list[str]) -> Manifest:
    """Hash ``files`` into the manifest and write it: the dataset exists only once this lands."""
    store = open_storage(root)
    data = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    data["files"] = {name: _safe_child(Path(root), name) and store.sha256(name) for name in files}
    record = Manifest.from_dict(data, str(store.path(MANIFEST)))
    store.write_atomic(MANIFEST, record.to_json(indent=2))
    return record


def read_manifest(root: str | Path) -> Manifest:
    """Parse manifest.json without checking the files' hashes (for reports and status)."""
    store = open_storage(root)
    if not store.exists(MANIFEST):
        raise ManifestError(f"{store.path(MANIFEST)}: no manifest; run `pretrain prepare` for this dataset first")
    return Manifest.from_json(store.read_bytes(MANIFEST), str(store.path(MANIFEST)))


def verify_manifest(root: str | Path) -> Manifest:
    """Load manifest.json and check every listed file's sha256; raise ManifestError naming the file."""
    store = open_storage(root)
    manifest = read_manifest(root)
    for name, expected in manifest.files.items():
        file = _safe_child(Path(root), name)
        if not store.exists(name):
            raise ManifestError(f"{file}: listed in the manifest but missing")
        actual = store.sha256(name)
        if actual != expected:
            raise CorruptManifest(file, f"sha256 {actual[:12]}… does not match the manifest's {expected[:12]}… "
                                        f"(the file changed or is corrupt; re-run `pretrain prepare`)")
    return manifest


def manifest_sha256(root: str | Path) -> str:
    return hashlib.sha256(open_storage(root).read_bytes(MANIFEST)).hexdigest()


def same_or_grown(manifest: Manifest | dict, current_sha: str, trained_sha: str) -> bool:
    """True when a checkpoint trained on ``trained_sha`` may continue on this manifest: it is the
    same dataset, or one grown from it by `pretrain prepare --append` (its ``lineage`` lists every
    manifest it grew from)."""
    lineage = manifest.lineage if isinstance(manifest, Manifest) else (manifest or {}).get("lineage") or []
    return trained_sha == current_sha or trained_sha in lineage
