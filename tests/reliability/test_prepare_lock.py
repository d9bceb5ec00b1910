"""One `pretrain prepare` per dataset directory: two started at once never both write it.

Real processes started together on one ``data.output_dir``: in every trial exactly one prepares (or
appends), the other exits 3 with one stderr line naming the holder, having touched nothing, and the
dataset verifies against its manifest. A holder killed with SIGKILL leaves a stale lease that the
next prepare takes over at once (same host, the pid is gone).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

import pytest

from reliability.data_harness import (
    assert_one_line, dataset_files, env_for, finish, group_gone, make_corpus, prepare_args, run, start, wait_for,
)

pytestmark = pytest.mark.e2e
ROOT_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    c = make_corpus(root, n_docs=3000)  # a few seconds of work: both processes are up long before it ends
    ref = root / "reference"
    done = run(prepare_args(ref, c.sources))
    assert done.rc == 0, done.err
    return {"root": root, "corpus": c, "ref": ref, "files": dataset_files(ref)}


def _race(args_a: list[str], args_b: list[str]):
    a, b = start(args_a), start(args_b)
    return finish(a), finish(b)


def _one_won(done_a, done_b, out):
    assert sorted([done_a.rc, done_b.rc]) == [0, 3], (done_a.rc, done_a.err, done_b.rc, done_b.err)
    loser = done_a if done_a.rc == 3 else done_b
    assert_one_line(loser, 3, f"{out} is being prepared by pid", "on ", "lease")
    assert "dedup" not in loser.out and "tokenizer" not in loser.out  # it did no work at all
    return dataset_files(out)  # verifies every file's sha256


@pytest.mark.parametrize("trial", range(2))
def test_two_prepares_at_once_on_a_new_directory(corpus, tmp_path, trial):
    out = tmp_path / "data"
    args = prepare_args(out, corpus["corpus"].sources)
    assert _one_won(*_race(args, args), out) == corpus["files"]


@pytest.mark.parametrize("trial", range(2))
def test_two_forced_rebuilds_at_once_on_a_prepared_directory(corpus, tmp_path, trial):
    out = tmp_path / "data"
    shutil.copytree(corpus["ref"], out)
    args = prepare_args(out, corpus["corpus"].sources, extra=("--force",))
    assert _one_won(*_race(args, args), out) == corpus["files"]


@pytest.mark.parametrize("trial", range(2))
def test_two_appends_at_once_grow_the_dataset_once(corpus, tmp_path, trial):
    sys.path.insert(0, ROOT_TESTS)
    from conftest import write_corpus

    from pipeline.data.manifest import verify_manifest

    out = tmp_path / "data"
    shutil.copytree(corpus["ref"], out)
    new = tmp_path / "more.jsonl"
    write_corpus(new, 400, start=3000)
    c = corpus["corpus"]
    sources = f"[{{path: '{c.docs}', name: docs}}, {{path: '{c.notes}', name: notes}}, {{path: '{new}', name: more}}]"
    args = prepare_args(out, sources, extra=("--append",))
    files = _one_won(*_race(args, args), out)
    grown = verify_manifest(out)
    assert len(grown.appends) == 1 and len(grown.lineage) == 1  # appended once, not twice
    assert {k: v for k, v in files.items() if k in corpus["files"]} == corpus["files"]  # old files untouched


def test_a_killed_holder_leaves_a_stale_lock_the_next_prepare_takes_over(corpus, tmp_path):
    out, marker = tmp_path / "data", tmp_path / "marker"
    proc = start(prepare_args(out, corpus["corpus"].sources), env_for("pause:shards:3", marker))
    wait_for(marker, proc)
    assert (out / "prepare.lock").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    assert group_gone(proc.pid)
    done = run(prepare_args(out, corpus["corpus"].sources))
    assert done.rc == 0, done.err
    assert "took over the stale lock of pid" in done.out
    assert dataset_files(out) == corpus["files"]
