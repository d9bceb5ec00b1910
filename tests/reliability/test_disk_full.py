"""Disk full while a checkpoint is written: the run directory sits on a small tmpfs that the test
mounts (as root; skipped otherwise) with room for the first checkpoint and not the second. The job
ends with one stderr line "no space left on device writing X (needs ~N MB, M free)", exit 1, no C++
iostream or torch report reaching the user, nothing committed for the failed step (its staged
files are removed, so the space is free again) and the earlier checkpoint intact; `pretrain plan`
warns beforehand when checkpoint.keep_last checkpoints do not fit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from reliability.harness import write_config
from reliability.training_faults import assert_one_line, run_cli
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e


def _checkpoint_mb(reference) -> float:
    newest = ckpt.latest_committed(reference.run_dir / "checkpoints")
    return sum(p.stat().st_size for p in newest.path.iterdir()) / 1e6


@pytest.fixture
def small_disk(tmp_path, reference):
    """A tmpfs holding one checkpoint and a half (removed afterwards)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    size_mb = int(_checkpoint_mb(reference) * 1.5) + 1
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("nproc", [2, 1], ids=["two-ranks", "one-rank"])
def test_disk_full_during_a_checkpoint_is_one_line_and_nothing_is_committed(tiny, small_disk, nproc):
    run_dir = small_disk / "run"
    cfg = write_config(small_disk.parent / "cfg.yaml", run_dir, tiny.data_dir, tiny.sources,
                       train={"nproc_per_node": nproc})
    start = time.monotonic()
    proc, took = run_cli("train", str(cfg), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = assert_one_line(proc.stderr, "no space left on device writing", str(run_dir / "checkpoints"),
                           "nothing was committed")
    needs, free = map(int, re.search(r"needs ~(\d+) MB, (\d+) MB free", line).groups())
    assert needs >= 1 and free < needs, line
    committed = [c.step for c in ckpt.committed_checkpoints(run_dir / "checkpoints")]
    assert committed == [2], committed  # the first fits, the second does not
    ckpt.verify_checkpoint(run_dir / "checkpoints" / ckpt.tag_for(2))
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the failed save's files were left behind"
    assert not (run_dir / "checkpoints" / ckpt.tag_for(4)).exists()
    assert "Traceback" not in proc.stdout and "iostream" not in proc.stdout
    assert took < 120 and time.monotonic() - start < 180


def test_plan_warns_when_keep_last_checkpoints_exceed_the_free_space(tiny, small_disk, reference):
    run_dir = small_disk / "run"
    cfg = write_config(small_disk.parent / "cfg.yaml", run_dir, tiny.data_dir, tiny.sources,
                       checkpoint={"keep_last": 3})
    proc, _ = run_cli("plan", str(cfg))
    assert proc.returncode == 0, proc.stdout[-2000:]  # a warning, not a blocking check
    (warn,) = [line for line in proc.stdout.splitlines() if line.startswith("[warn] disk")]
    assert "checkpoint.keep_last 3" in warn and "exceed" in warn and str(small_disk) in warn
    roomy = tiny.config("disk-plan-ok", checkpoint={"keep_last": 3})[0]
    ok = run_cli("plan", str(roomy))[0]
    assert any(line.startswith("[ok  ] disk") and "fit in" in line for line in ok.stdout.splitlines()), ok.stdout


def test_the_tmpfs_really_is_full_at_the_size_used(small_disk, reference):
    """The fixture's premise: one checkpoint fits, two do not."""
    one = _checkpoint_mb(reference)
    total = shutil.disk_usage(small_disk).total / 1e6
    assert one < total < 2 * one
    Path(small_disk / "x").write_bytes(b"")
