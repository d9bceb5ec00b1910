"""A full disk while `pretrain prepare` writes: one line "no space left on device writing X (needs ~N
MB, M MB free)", exit 1, nothing committed, this run's partial shards removed; with space freed the
next run resumes and writes the same dataset.

The dataset directory is on a small tmpfs this test mounts (root only; skipped otherwise). The disk
fills for real: a tmpfs smaller than the shards, or ``data_faults/sitecustomize.py`` filling the
tmpfs with a filler file right before a given file is written (the write then meets a real ENOSPC).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reliability.data_harness import (
    assert_one_line, dataset_files, debris, env_for, make_corpus, prepare_args, run,
)

pytestmark = pytest.mark.e2e
MESSAGE = re.compile(r"no space left on device writing (\S+) \(needs ~([\d.,]+) MB, ([\d.,]+) MB free\)")


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _resize(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("diskfull")
    c = make_corpus(root)
    ref = root / "reference"
    done = run(prepare_args(ref, c.sources))
    assert done.rc == 0, done.err
    size = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    return {"root": root, "corpus": c, "ref": ref, "files": dataset_files(ref), "bytes": size}


def _check_full(done, out: Path, file_pattern: str) -> str:
    line = assert_one_line(done, 1, "no space left on device writing")
    m = MESSAGE.search(line)
    assert m, line
    assert re.search(file_pattern, m.group(1)), (file_pattern, line)
    assert float(m.group(2).replace(",", "")) > 0, line  # needs ~N MB: something, and said
    assert not (out / "manifest.json").exists() and not debris(out)  # nothing committed, no torn file
    assert not (out / "train").exists() and not (out / "validation").exists()  # partial shards removed
    return line


def test_shards_bigger_than_the_disk(corpus, tmp_path):
    """Exact dedup only (its scratch is small), so the shards are what does not fit."""
    args = lambda out: prepare_args(out, corpus["corpus"].sources, "data.dedup.near=false")  # noqa: E731
    ref = tmp_path / "reference"
    assert run(args(ref)).rc == 0
    shards = sum(p.stat().st_size for p in ref.glob("*/*.bin"))
    others = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file() and p.suffix not in (".bin", ".idx"))
    with tmpfs(tmp_path / "mnt", (others + shards // 3) // 4096 * 4096 + 8192) as mnt:
        out = mnt / "data"
        _check_full(run(args(out)), out, r"/(train|validation)/\w+-\d{5}\.(bin|idx)$")
        _resize(mnt, 4 * corpus["bytes"])
        done = run(args(out))
        assert done.rc == 0, done.err
        assert "dedup: reused" in done.out and "tokenizer: reused" in done.out
        assert dataset_files(out) == dataset_files(ref)


def test_the_disk_fills_while_the_quarantine_is_written(tmp_path):
    """A source with many long bad records: the quarantine is the first file to meet the full disk."""
    import json

    junk = tmp_path / "junk.jsonl"
    lines = [json.dumps({"text": f"short {i}"}) if i % 2 else '{"text": "' + "x" * 400 for i in range(3000)]
    junk.write_text("\n".join(lines) + "\n")
    args = lambda out: prepare_args(out, f"[{{path: '{junk}'}}]", "data.max_quarantine_share=1.0")  # noqa: E731
    ref = tmp_path / "reference"
    assert run(args(ref)).rc == 0
    size = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    with tmpfs(tmp_path / "mnt", 4 * size) as mnt:
        out, filler = mnt / "data", mnt / "filler"
        _check_full(run(args(out), env_for("fill:quarantine.jsonl", fill=filler)), out, r"/quarantine\.jsonl$")
        filler.unlink()
        assert run(args(out)).rc == 0
        assert dataset_files(out) == dataset_files(ref)


FILLED = [  # (the fault, the file the message names)
    ("fill:dedup:2", r"/\.dedup-spill$"),
    ("fill:duplicates.jsonl", r"/duplicates\.jsonl$"),
    ("fill:dedup.json", r"/\.stages/dedup\.json$"),
    ("fill:tokenizer.json", r"/tokenizer\.json$"),
    ("fill:shards:3", r"/(train|validation)/\w+-\d{5}\.(bin|idx)$|/quarantine\.jsonl$"),
    ("fill:manifest.json", r"/manifest\.json$"),
]


@pytest.mark.parametrize(("fault", "names"), FILLED, ids=[f[0] for f in FILLED])
def test_the_disk_fills_while_a_file_is_written(corpus, tmp_path, fault, names):
    with tmpfs(tmp_path / "mnt", 4 * corpus["bytes"]) as mnt:
        out, filler = mnt / "data", mnt / "filler"
        args = prepare_args(out, corpus["corpus"].sources)
        _check_full(run(args, env_for(fault, fill=filler)), out, names)
        filler.unlink()
        done = run(args)
        assert done.rc == 0, done.err
        assert dataset_files(out) == corpus["files"]


def test_a_full_disk_before_the_lock_is_taken(corpus, tmp_path):
    with tmpfs(tmp_path / "mnt", 1 << 20) as mnt:
        out, filler = mnt / "data", mnt / "filler"
        out.mkdir()
        subprocess.run([sys.executable, "-c", f"import os\nf = open({str(filler)!r}, 'wb')\n"
                        "try:\n    while True: f.write(b'0' * 4096); f.flush()\nexcept OSError: pass"], check=False)
        _check_full(run(prepare_args(out, corpus["corpus"].sources)), out, r"/prepare\.lock$")


def test_a_full_disk_during_an_append_leaves_the_dataset_as_it_was(corpus, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import write_corpus

    with tmpfs(tmp_path / "mnt", 4 * corpus["bytes"]) as mnt:
        out, filler = mnt / "data", mnt / "filler"
        shutil.copytree(corpus["ref"], out)
        new = tmp_path / "more.jsonl"
        write_corpus(new, 200, start=2000)
        c = corpus["corpus"]
        sources = f"[{{path: '{c.docs}', name: docs}}, {{path: '{c.notes}', name: notes}}, {{path: '{new}', name: more}}]"
        args = prepare_args(out, sources, extra=("--append",))
        line = assert_one_line(run(args, env_for("fill:shards:1", fill=filler)), 1, "no space left on device writing",
                               "/.append-staging/")
        assert MESSAGE.search(line), line
        assert dataset_files(out) == corpus["files"]  # the dataset as it was, every hash intact
        assert not (out / ".append-staging").exists() and not debris(out)
        filler.unlink()
        done = run(args)
        assert done.rc == 0, done.err
        from pipeline.data.manifest import verify_manifest

        assert len(verify_manifest(out).appends) == 1
