"""Atomic checkpoints: only a checkpoint with a valid COMMIT marker exists for anyone.

Saving: every rank writes into ``.tmp-step_N`` → barrier → rank 0 renames it to ``step_N``, writes
``COMMIT`` (sha256 of every file, written atomically), then points ``latest`` at it (atomic
rename), then applies retention. A crash at any moment leaves either a ``.tmp-`` directory or a
``step_N`` without ``COMMIT``; both are ignored by resume and eval, and swept on the next save.

Each checkpoint holds the DeepSpeed engine state, ``model.safetensors`` (the full fp32 weights,
readable without DeepSpeed or unpickling), ``trainer_state.json`` (step, consumed samples, data
manifest hash, W&B run id, per-rank sample digests), ``config.yaml`` and per-rank RNG states.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.shards import sha256_file

COMMIT = "COMMIT"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, uncommitted or altered after it was committed."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Committed:
    path: Path
    step: int

    @property
    def tag(self) -> str:
        return self.path.name

    def trainer_state(self) -> dict:
        return json.loads((self.path / "trainer_state.json").read_text(encoding="utf-8"))


def committed_step(path: Path) -> int:
    m = _TAG.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a name like step_00000100)")
    return int(m.group(1))


def committed_checkpoints(root: str | Path) -> list[Committed]:
    """Checkpoints under ``root`` that carry a COMMIT marker, oldest first (hashes not checked)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _TAG.match(child.name)
        if m and child.is_dir() and (child / COMMIT).is_file():
            found.append(Committed(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file listed in COMMIT against its sha256; raise CheckpointError naming the file."""
    path = Path(path)
    marker = path / COMMIT
    if not marker.is_file():
        raise CheckpointError(f"{path}: not committed (no {COMMIT} marker); it was never finished")
    try:
        commit = json.loads(marker.read_text(encoding="utf-8"))
        files = commit["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{marker}: unreadable commit marker") from None
    root = path.resolve()
    for name, expected in files.items():
        file = (path / name).resolve()
        if not file.is_relative_to(root):
            raise CheckpointError(f"{marker}: entry {name!r} points outside the checkpoint")
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {COMMIT} but missing")
        if sha256_file(file) != expected:
            raise CheckpointError(f"{file}: sha256 does not match {COMMIT}; the checkpoint was altered or is corrupt")
    return commit


def latest_committed(root: str | Path, verify: bool = True) -> Committed | None:
    found = committed_checkpoints(root)
    if not found:
        return None
    if verify:
        verify_checkpoint(found[-1].path)
    return found[-1]


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(root: Path, tmp_dir: Path, step: int, keep_last: int, keep_every_steps: int | None = None) -> Path:
    """Rank 0, after every rank has written into ``tmp_dir``: publish it as step N."""
    final = root / tag_for(step)
    if final.exists():  # an earlier attempt died before COMMIT: it is garbage
        shutil.rmtree(final)
    os.rename(tmp_dir, final)
    files = {
        str(p.relative_to(final)): sha256_file(p)
        for p in sorted(final.rglob("*"))
        if p.is_file()
    }
    _fsync_write(final / COMMIT, json.dumps({"step": step, "files": files}, indent=1) + "\n")
    _fsync_write(root / LATEST, final.name + "\n")
    apply_retention(root, keep_last, keep_every_steps)
    return final


def tidy(root: str | Path, keep_last: int, keep_every_steps: int | None = None) -> None:
    """Finish what a crash after the newest commit left undone (``latest`` not yet pointing at it,
    retention cut short); a later commit would do it, but a finished run has none."""
    root = Path(root)
    newest = latest_committed(root, verify=False)
    if newest is None:
        return
    latest = root / LATEST
    if not latest.is_file() or latest.read_text(encoding="utf-8").strip() != newest.tag:
        _fsync_write(latest, newest.tag + "\n")
    apply_retention(root, keep_last, keep_every_steps)


def retained_steps(steps: list[int], keep_last: int, keep_every_steps: int | None = None) -> set[int]:
    """Which committed steps retention keeps: the newest ``keep_last``, plus every multiple of
    ``keep_every_steps`` (kept forever, e.g. for later evaluation or a rewind)."""
    steps = sorted(steps)
    keep = set(steps[-keep_last:]) if keep_last else set(steps)
    if keep_every_steps:
        keep |= {s for s in steps if s % keep_every_steps == 0}
    return keep


def apply_retention(root: Path, keep_last: int, keep_every_steps: int | None = None) -> list[Path]:
    """Delete committed checkpoints that `retained_steps` does not keep, and debris (uncommitted
    directories) older than the newest committed one. Nothing newer than that is touched: a save in
    flight stays."""
    found = committed_checkpoints(root)
    keep = retained_steps([c.step for c in found], keep_last, keep_every_steps)
    removed = []
    for old in found:
        if old.step not in keep:
            (old.path / COMMIT).unlink()  # first: a crash mid-delete leaves debris, not a broken commit
            shutil.rmtree(old.path)
            removed.append(old.path)
    newest = found[-1].step if found else -1
    for child in root.iterdir():
        name = child.name.removeprefix(".tmp-")
        m = _TAG.match(name)
        if m and int(m.group(1)) < newest and not (child / COMMIT).is_file() and child.is_dir():
            shutil.rmtree(child)
            removed.append(child)
    return removed
