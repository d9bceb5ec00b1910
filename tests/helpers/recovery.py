"""What the recovery and preemption tests read from a run, and how they kill ranks: from the run's
own records (metrics.jsonl, checkpoints) and /proc, never from our functions."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line while the run writes
            continue
    return out


def trained_step(run: Path) -> int:
    return max((r["step"] for r in rows(run) if "train/loss" in r), default=0)


def losses(run: Path) -> dict[int, float]:
    """step → train/loss; a step trained again after a resume must repeat its loss bit for bit."""
    seen: dict[int, float] = {}
    for r in rows(run):
        if "train/loss" not in r:
            continue
        if r["step"] in seen:
            assert seen[r["step"]] == r["train/loss"], f"step {r['step']}: {seen[r['step']]} then {r['train/loss']}"
        seen[r["step"]] = r["train/loss"]
    return seen


def restarts(run: Path) -> list[tuple[int, int]]:
    """(step, n) of every launch/restart row."""
    return [(r["step"], r["launch/restart"]) for r in rows(run) if "launch/restart" in r]


def rank_pids(*markers: str, cmdline_has: str = "") -> list[int]:
    """Training ranks (`pipeline.cli train` under torchrun: LOCAL_RANK set) whose environment holds
    every ``KEY=VALUE`` of ``markers`` (and whose command line contains ``cmdline_has``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if (b"pipeline.cli" in cmd and b"torch.distributed.run" not in cmd and cmdline_has.encode() in b" ".join(cmd)
                and any(e.startswith(b"LOCAL_RANK=") for e in env) and all(m.encode() in env for m in markers)):
            found.append(int(proc.name))
    return found


def wait_for(what, timeout: float, message: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")


def kill_all(pids: list[int]) -> float:
    """SIGKILL ``pids``; the wall-clock time of the kill."""
    at = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return at


def first_step_after(run: Path, at: float) -> tuple[int, float]:
    """The first train step logged after wall-clock ``at``, and how long after ``at`` it was logged."""
    after = [r for r in rows(run) if "train/loss" in r and r["time"] > at]
    assert after, "no step was trained after the kill"
    return after[0]["step"], after[0]["time"] - at


def descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False
