"""manifest.json: what a prepared dataset holds, and the sha256 of every file it is made of.

Training and evaluation call `verify_manifest` before reading a single token, so a flipped byte, a
truncated index or a swapped tokenizer is refused with the file's name instead of trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.data.shards import sha256_file

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A prepared dataset that is missing, incomplete or altered since it was written."""


def _safe_child(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ManifestError(f"{root / MANIFEST}: file entry {name!r} points outside the dataset directory")
    return path


def write_manifest(root: Path, manifest: dict, files: list[str]) -> None:
    manifest = dict(manifest, files={name: sha256_file(_safe_child(root, name)) for name in files})
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)  # the dataset exists only once this rename lands


def verify_manifest(root: str | Path) -> dict:
    """Load manifest.json and check every listed file's sha256; raise ManifestError naming the file."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; run `pretrain prepare` for this dataset first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{path}: lists no files")
    read = [f"{prefix}.{ext}" for split in (manifest.get("splits") or {}).values()
            for src in (split.get("sources") or {}).values() for prefix in src.get("shards", [])
            for ext in ("bin", "idx")] + [f for f in [(manifest.get("tokenizer") or {}).get("file")] if f]
    unhashed = [name for name in read if name not in files]
    if unhashed:  # a shard named in `splits` but absent from `files` would be read unverified
        raise ManifestError(f"{path}: {unhashed[0]!r} is read by training but has no sha256 in `files`")
    for name, expected in files.items():
        file = _safe_child(root, name)
        if not file.is_file():
            raise ManifestError(f"{file}: listed in the manifest but missing")
        actual = sha256_file(file)
        if actual != expected:
            raise ManifestError(
                f"{file}: sha256 {actual[:12]}… does not match the manifest's {expected[:12]}… "
                f"(the file changed or is corrupt; re-run `pretrain prepare`)"
            )
    return manifest


def manifest_sha256(root: str | Path) -> str:
    return hashlib.sha256((Path(root) / MANIFEST).read_bytes()).hexdigest()


def same_or_grown(manifest: dict, current_sha: str, trained_sha: str) -> bool:
    """True when a checkpoint trained on ``trained_sha`` may continue on this manifest: it is the
    same dataset, or one grown from it by `pretrain prepare --append` (its ``lineage`` lists every
    manifest it grew from)."""
    return trained_sha == current_sha or trained_sha in (manifest.get("lineage") or [])
