"""Two `pretrain train` on one run directory: the second is refused while the first holds the lease,
and a lease left by a SIGKILLed trainer is taken over once it expires."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, pretrain, tiny_overrides
from pipeline.launch.lock import LOCK_FILE

pytestmark = pytest.mark.e2e


def _sets(trained_run, tmp_path: Path, *extra: str) -> list[str]:
    sets = tiny_overrides(tmp_path, f"[{{path: '{trained_run['tmp']}/unused.jsonl'}}]")
    # the prepared data of the session's run; a fresh run directory
    sets += ["--set", f"data.output_dir={trained_run['data_dir']}", "--set", "train.nproc_per_node=1"]
    for e in extra:
        sets += ["--set", e]
    return sets


def _start(sets: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "configs/demo.yaml", *sets],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_lock(run_dir: Path, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / LOCK_FILE).is_file():
            return json.loads((run_dir / LOCK_FILE).read_text())
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited {proc.returncode} before locking:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("no run.lock appeared")


def test_second_trainer_on_a_locked_run_dir_exits_3_with_a_clear_message(trained_run, tmp_path):
    # long enough (many steps) that the first is still training when the second starts
    sets = _sets(trained_run, tmp_path, "train.max_steps=400", "checkpoint.save_interval_steps=400")
    first = _start(sets)
    try:
        holder = _wait_for_lock(tmp_path / "run", first)
        assert holder["pid"] == first.pid and holder["host"]
        second = pretrain("train", "configs/demo.yaml", *sets, check=False, timeout=120)
        assert second.returncode == 3, second.stdout + second.stderr
        assert f"is being trained by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(60)


def test_lock_of_a_sigkilled_trainer_is_taken_over_after_its_lease(trained_run, tmp_path):
    lease = ["launch.lock_lease_s=3", "launch.lock_heartbeat_s=0.5"]
    run_dir = tmp_path / "run"
    victim = _start(_sets(trained_run, tmp_path, "train.max_steps=400", "checkpoint.save_interval_steps=400", *lease))
    _wait_for_lock(run_dir, victim)
    os.killpg(victim.pid, signal.SIGKILL)  # the trainer and its ranks: nothing releases the lock
    victim.wait(30)
    left = json.loads((run_dir / LOCK_FILE).read_text())
    # as if it had run on another node of a shared filesystem: only the lease can tell it is gone
    # and its lease still runs (set explicitly, so a slow start on a busy machine cannot outlive it)
    left["host"] = "node-that-died"
    left["expires_at"] = time.time() + 600
    (run_dir / LOCK_FILE).write_text(json.dumps(left))

    sets = _sets(trained_run, tmp_path, "train.max_steps=2", "checkpoint.save_interval_steps=2", *lease)
    refused = pretrain("train", "configs/demo.yaml", *sets, check=False, timeout=120)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "node-that-died" in refused.stderr
    left["expires_at"] = time.time() - 1  # the lease ran out: nobody renewed it
    (run_dir / LOCK_FILE).write_text(json.dumps(left))
    done = pretrain("train", "configs/demo.yaml", *sets, timeout=300)
    assert f"took over a stale run lock of pid {left['pid']} on node-that-died" in done.stdout
    assert (run_dir / "checkpoints" / "step_00000002" / "COMMIT").is_file()
    assert not (run_dir / LOCK_FILE).exists()  # released at the end
