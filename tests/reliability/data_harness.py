"""Harness of the data fault tests: a corpus, `pretrain prepare` as a real process, and the checks
every fault must pass (one stderr line, no traceback, nothing committed, the dataset as before).

A prepare is started the way a user or a scheduler starts it: ``python -m pipeline.cli prepare`` in
a session of its own (so the test can signal its whole process group, as a terminal's Ctrl-C
does), with ``data_faults/`` on PYTHONPATH when a fault is injected there.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA_FAULTS = Path(__file__).resolve().parent / "data_faults"
BAD_LINES = [b'{"text": "unterminated', b"\xff\xfe not utf-8", b'{"body": "no text field"}', b"[1, 2]"]


@dataclass(frozen=True)
class Corpus:
    """Two sources: ``docs`` (jsonl, real text) and ``notes`` (jsonl.gz, some bad lines)."""

    docs: Path
    notes: Path

    @property
    def sources(self) -> str:
        return f"[{{path: '{self.docs}', name: docs}}, {{path: '{self.notes}', name: notes}}]"


def make_corpus(root: Path, n_docs: int = 1000) -> Corpus:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_corpus

    docs = root / "docs.jsonl"
    texts = write_corpus(docs, n_docs)
    lines = [json.dumps({"text": f"note {i}: {t[:300]}"}).encode() for i, t in enumerate(texts[::7])]
    for i, bad in enumerate(BAD_LINES * 3):
        lines.insert(3 * i + 1, bad)
    notes = root / "notes.jsonl.gz"
    notes.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", mtime=0))
    return Corpus(docs, notes)


def prepare_args(out: Path, sources: str, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    base = [f"data.output_dir={out}", f"data.sources={sources}", "data.tokenizer.vocab_size=512",
            "data.executor=local", "data.num_cpus=2", "data.block_bytes=4096", "data.dedup.exact=true",
            "data.dedup.near=true", "launch.lock_lease_s=30", "launch.lock_heartbeat_s=5", *sets]
    return ["prepare", "configs/demo.yaml", *extra, *[a for s in base for a in ("--set", s)]]


def env_for(fault: str | None = None, marker: Path | None = None, fill: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRETRAIN_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(DATA_FAULTS)] * bool(fault) + [str(ROOT)])
    if fault:
        env["PRETRAIN_DATA_FAULT"] = fault
        env["PRETRAIN_DATA_FAULT_MARKER"] = str(marker or "/dev/null")
        if fill:
            env["PRETRAIN_DATA_FAULT_FILL"] = str(fill)
    return env


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env or env_for(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@dataclass(frozen=True)
class Done:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def finish(proc: subprocess.Popen, t0: float | None = None, timeout: float = 300) -> Done:
    """Wait for the prepare (and for every process holding its output pipes: its workers too)."""
    t0 = time.time() if t0 is None else t0
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"prepare (or a worker keeping its pipes open) still ran after {timeout} s:\n"
                             f"{out[-2000:]}\n{err[-2000:]}") from None
    return Done(proc.returncode, out, err, time.time() - t0)


def run(args: list[str], env: dict | None = None, timeout: float = 300) -> Done:
    t0 = time.time()
    return finish(start(args, env), t0, timeout)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"prepare exited {proc.returncode} before the fault point:\n"
                                 f"{proc.stdout.read()}\n{proc.stderr.read()}")
        if time.time() > deadline:
            raise AssertionError(f"the fault point {path.name} was not reached in {timeout} s")
        time.sleep(0.02)


def group_gone(pgid: int, timeout: float = 10) -> bool:
    """Whether every process of the prepare's session (its forked workers too) has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    return False


def assert_one_line(done: Done, rc: int, *needles: str) -> str:
    """The fault ended the run with ``rc`` and exactly one stderr line holding every needle."""
    text = done.out + done.err
    assert done.rc == rc, f"exit {done.rc}, expected {rc}\n{done.out[-2000:]}\n{done.err[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    assert len(done.err_lines) == 1, done.err
    line = done.err_lines[0]
    for needle in needles:
        assert needle in line, line
    return line


def dataset_files(out: Path) -> dict[str, str]:
    """The dataset's verified ``files`` (relative path → sha256): equal dicts are byte-identical datasets."""
    from pipeline.data.manifest import verify_manifest

    return dict(verify_manifest(out).files)


def debris(out: Path) -> list[str]:
    """Half-written files (``NAME.tmp``) left in the dataset directory."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tmp"))
